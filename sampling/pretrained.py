"""The model that ships with the repo, so that `python generate.py` draws digits before any
training: the CPU preset (conditional, 0.26M parameters) trained by the repo's own command
(README, "Digits before training"), EMA weights only, its SHA-256 checked on every load.

    load_model("pretrained")              # Python
    python generate.py --checkpoint pretrained
"""
from __future__ import annotations

from pathlib import Path

from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.files import check_recorded, sha256_of

NAME = "pretrained"
WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "mnist_cpu_pretrained.pt"
SHA256 = "a436a6f59285a823a03a54b672e535f1d9ee64419ee468bf57187bf647c4702c"
# How it was made (README): the command, its seed and steps, and the quality it measured.
RECIPE = "python main.py --max-steps 43000 --name pretrained (--preset cpu, --seed 0)"
# What its checkpoint does not record, for the model card of its export (README: 60
# minutes on the 2-core AMD EPYC that trained it, one thread; PyTorch 2.14.1) ...
RECORDED = {"elapsed": 3600.0,
            "machines": [{"step": 0, "cpu": "AMD EPYC", "cores": 2, "threads": 1, "gpu": None,
                          "torch": "2.14.1"}]}
# ... and `python generate.py --checkpoint pretrained --evaluate` on that machine.
EVALUATION = {"checkpoint": NAME, "num_samples": 10_000, "sampler": "dpm-solver-20-eta1",
              "guidance": 1.0, "fid": 3.63, "confident_fraction": 0.963,
              "conditional_accuracy": 0.980,
              "floor": {"fid": 2.88, "confident_fraction": 0.977, "conditional_accuracy": 0.9938},
              "source": "python generate.py --checkpoint pretrained --evaluate"}


def available() -> bool:
    return WEIGHTS.is_file()


def resolve(checkpoint) -> Path:
    """A checkpoint path as given, or the shipped model's for "pretrained" (checked)."""
    if str(checkpoint) != NAME:
        return Path(checkpoint)
    check_recorded(WEIGHTS, SHA256, "the pretrained model",
                   "restore it with `git checkout -- models/weights/`", CheckpointError)
    return WEIGHTS


def export(checkpoint, path=WEIGHTS) -> str:
    """Write a checkpoint's EMA weights and config (nothing to resume training with) to
    `path`; returns the file's SHA-256, to record in SHA256."""
    state = load_checkpoint(checkpoint)
    ema = state["ema"]
    config = {**state["config"], "DATA_DIR": "", "CHECKPOINT_DIR": "", "OUTPUT_DIR": ""}
    small = {"config": config, "ema": ema, "model": ema,  # one copy: shared tensors
             "step": state["step"], "epoch": state["epoch"],
             "evaluations": state.get("evaluations", []), "exported_from": str(checkpoint)}
    save_checkpoint(small, path)
    return sha256_of(path)
