"""What the tests share: the tiny model, training it, running the scripts, and checks.

Everything runs on the CPU and never touches the network. MNIST comes from the repo's
own data/MNIST/raw (the shipped .gz files), or from $MNIST_DATA_DIR.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import Config  # noqa: E402

DATA_DIR = Path(os.environ.get("MNIST_DATA_DIR", ROOT / "data"))
FASHION_DIR = ROOT.parent / "shared" / "data" / "fashion-mnist"  # on these machines and in CI

# A model small enough to train a few steps in a second on a CPU, as Config fields ...
TINY = dict(MODEL_CHANNELS=8, TIME_EMBED_DIM=16, NUM_RES_BLOCKS=1, ATTENTION=True, TIMESTEPS=50,
            BATCH_SIZE=16, TRAIN_SIZE=64, EPOCHS=3, LEARNING_RATE=1e-3, LR_WARMUP_STEPS=2,
            NUM_SAMPLES=4, SAMPLING_STEPS=5, SAVE_EVERY=1, PRINT_EVERY=2, DEVICE="cpu", SEED=0,
            DROPOUT=0.1)
# ... and as flags of main.py.
TINY_FLAGS = ["--model-channels", "8", "--time-embed-dim", "16", "--num-res-blocks", "1",
              "--timesteps", "50", "--train-size", "64", "--batch-size", "16",
              "--sampling-steps", "5", "--num-samples", "4", "--device", "cpu", "--no-download",
              "--quiet", "--preset", "none"]


def quiet(*args, **kwargs):
    pass


def tiny_config(tmp_path: Path, data_dir: Path = DATA_DIR, **changes) -> Config:
    """The tiny model's Config, writing under tmp_path (ck/ and out/)."""
    settings = dict(TINY, DATA_DIR=str(data_dir), CHECKPOINT_DIR=str(tmp_path / "ck"),
                    OUTPUT_DIR=str(tmp_path / "out"))
    settings.update(changes)
    return Config(**settings).validate()


def train(config: Config, resume=None, **kwargs):
    """A Trainer of `config` (resumed from `resume`, a state or path), after fit()."""
    from training.trainer import Trainer
    from utils import checkpoint as ckpt

    if isinstance(resume, (str, Path)):
        resume = ckpt.load_checkpoint(resume)
    trainer = Trainer(config, resume=resume, progress=False, log=quiet, **kwargs)
    trainer.fit()
    return trainer


def script_env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def run_script(script: str, *args, cwd=ROOT, timeout: float = 240, env=None
               ) -> subprocess.CompletedProcess:
    """`python <repo>/script args` in `cwd`, its output captured."""
    command = [sys.executable, *([str(ROOT / script)] if script.endswith(".py") else
                                 ["-m", script]), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env or script_env())


def start_script(script: str, *args, cwd=ROOT, env=None) -> subprocess.Popen:
    """`python <repo>/script args` in the background, stdout and stderr piped."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                            env=env or script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def fresh_clone(tmp_path: Path) -> Path:
    """The working tree as git would check it out: tracked and new files, no generated ones."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for name in files:
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


NO_NETWORK = '''
import socket
def _refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = _refuse
socket.create_connection = _refuse
'''


def offline_guard(tmp_path: Path) -> Path:
    """A folder whose sitecustomize.py refuses every network connection: on the
    PYTHONPATH of a process, it runs that process offline."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    return guard


def expect_one_line(capsys, entry, argv, code: int = 2) -> str:
    """Run a script's main(argv): it must end with `code` and exactly one line on stderr,
    no traceback. Returns that line."""
    try:
        result = entry([str(a) for a in argv])
    except SystemExit as stop:
        result = stop.code
    err = capsys.readouterr().err.strip()
    assert result == code, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def assert_same_weights(a, b, atol: float = 0.0) -> None:
    """Two trainers' (or state dicts') weights: bit for bit (atol 0) or within atol."""
    for key in ("model", "ema"):
        sa = getattr(a, key).state_dict() if hasattr(a, key) else a[key]
        sb = getattr(b, key).state_dict() if hasattr(b, key) else b[key]
        for name, value in sa.items():
            if atol:
                torch.testing.assert_close(value, sb[name], rtol=0, atol=atol, msg=name)
            else:
                assert torch.equal(value, sb[name]), f"{key}.{name}"


def stop_by_signal_after(trainer, steps: int) -> None:
    """Make `trainer` act as if Ctrl-C arrived during step `steps` (it saves and raises
    TrainingInterrupted)."""
    step = trainer.train_step

    def stopping(*batch):
        out = step(*batch)
        if trainer.step + 1 == steps:
            trainer._stop_signal = "SIGINT"
        return out

    trainer.train_step = stopping
