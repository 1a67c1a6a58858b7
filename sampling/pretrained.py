"""The model that ships with the repo, so that `python generate.py` draws digits before any
training: the CPU preset (conditional, 0.26M parameters) trained by the repo's own command
(README, "Digits before training"), EMA weights only, its SHA-256 checked on every load.

    load_model("pretrained")              # Python
    python generate.py --checkpoint pretrained
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

NAME = "pretrained"
WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "mnist_cpu_pretrained.pt"
SHA256 = "a436a6f59285a823a03a54b672e535f1d9ee64419ee468bf57187bf647c4702c"
# How it was made (README): the command, its seed and steps, and the quality it measured.
RECIPE = "python main.py --max-steps 43000 --name pretrained (--preset cpu, --seed 0)"


def available() -> bool:
    return WEIGHTS.is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def resolve(checkpoint) -> Path:
    """A checkpoint path as given, or the shipped model's for "pretrained" (checked)."""
    if str(checkpoint) != NAME:
        return Path(checkpoint)
    fix = "restore it with `git checkout -- models/weights/`"
    if not WEIGHTS.is_file():
        raise CheckpointError(f"the pretrained model {WEIGHTS} is missing; {fix}")
    found = _sha256(WEIGHTS)
    if found != SHA256:
        raise CheckpointError(f"the pretrained model {WEIGHTS} has SHA-256 {found[:16]}..., not "
                              f"the recorded {SHA256[:16]}...; {fix}")
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
    return _sha256(Path(path))
