"""Sampling from trained models: the Python API (`sampling.api`), the rules every draw
follows (`sampling.settings`) and the model that ships with the repo
(`sampling.pretrained`). generate.py is a thin command line over these functions."""
from sampling.api import (chain, draw, forward_process, generate_class_interpolation,  # noqa: F401
                          generate_images, generate_interpolation, guidance_strip,
                          interpolate_real, load_model, settings_for)
