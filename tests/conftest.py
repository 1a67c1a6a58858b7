"""Shared fixtures. Everything runs on the CPU and never touches the network.

MNIST comes from the repo's own data/MNIST/raw (the shipped .gz files, unpacked and
checked on first use), or from $MNIST_DATA_DIR.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import Config  # noqa: E402

torch.set_num_threads(int(os.environ.get("TEST_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    from utils.data_loader import ensure_mnist

    folder = Path(os.environ.get("MNIST_DATA_DIR", ROOT / "data"))
    ensure_mnist(folder, download=False)  # unpacks the shipped .gz files, or fails loudly
    return folder


def tiny_config(tmp_path: Path, data_dir: Path, **changes) -> Config:
    """A model small enough to train a few steps in a second on a CPU."""
    settings = dict(
        DATA_DIR=str(data_dir), CHECKPOINT_DIR=str(tmp_path / "ck"), OUTPUT_DIR=str(tmp_path / "out"),
        MODEL_CHANNELS=8, TIME_EMBED_DIM=16, NUM_RES_BLOCKS=1, ATTENTION=True, TIMESTEPS=50,
        BATCH_SIZE=16, TRAIN_SIZE=64, EPOCHS=3, LEARNING_RATE=1e-3, LR_WARMUP_STEPS=2,
        NUM_SAMPLES=4, SAMPLING_STEPS=5, SAVE_EVERY=1, PRINT_EVERY=2, DEVICE="cpu", SEED=0,
        DROPOUT=0.1,
    )
    settings.update(changes)
    return Config(**settings).validate()


@pytest.fixture
def tiny(tmp_path, data_dir):
    def make(**changes) -> Config:
        return tiny_config(tmp_path, data_dir, **changes)
    return make


@pytest.fixture(scope="session")
def quick_evaluator(tmp_path_factory, data_dir):
    """An Evaluator with the shipped classifier (loaded, not trained: seconds)."""
    from utils.metrics import Evaluator

    return Evaluator(data_dir, device="cpu", progress=False, log=lambda *a: None)


def expect_one_line(capsys, entry, argv, code: int = 2) -> str:
    """Run a script's main(argv): it must end with `code` and exactly one line on stderr,
    no traceback. Returns that line."""
    try:
        result = entry(argv)
    except SystemExit as stop:
        result = stop.code
    err = capsys.readouterr().err.strip()
    assert result == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err
