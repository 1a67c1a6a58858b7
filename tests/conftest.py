"""Shared fixtures (the helpers themselves are in tests/helpers.py). Everything runs on
the CPU and never touches the network; subprocess-heavy tests are marked `slow`
(`pytest -m "not slow"` is the edit loop)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import helpers

torch.set_num_threads(int(os.environ.get("TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from utils.datasets import open_dataset

    open_dataset("mnist", helpers.DATA_DIR, download=False)  # fails loudly without the data
    return helpers.DATA_DIR


@pytest.fixture
def tiny(tmp_path, data_dir):
    def make(**changes):
        return helpers.tiny_config(tmp_path, data_dir, **changes)
    return make


@pytest.fixture(scope="session")
def mnist():
    from utils.datasets import open_dataset

    return open_dataset("mnist", helpers.DATA_DIR, download=False)


@pytest.fixture(scope="session")
def quick_evaluator(mnist):
    """An Evaluator with the shipped classifier (loaded, not trained: seconds)."""
    from evaluation.metrics import Evaluator

    return Evaluator(mnist, device="cpu", progress=False, log=helpers.quiet)


@pytest.fixture
def shared_evaluator(monkeypatch, quick_evaluator):
    """The scripts' and the trainer's evaluations use the session's Evaluator."""
    from sampling import jobs
    from training import trainer

    monkeypatch.setattr(jobs, "make_evaluator_factory",
                        lambda args, progress: (lambda config: quick_evaluator))
    monkeypatch.setattr(trainer, "Evaluator", lambda *a, **k: quick_evaluator)
    return quick_evaluator
