"""A fresh clone works offline: the shipped MNIST, the quick start, the auto preset,
checked data files, and the functions the design names, called from Python."""
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from config import PRESETS, Config
from helpers import ROOT, expect_one_line, fresh_clone, offline_guard, quiet
from utils.checkpoint import load_checkpoint
from utils.datasets import DataDamagedError, idx, mnist, open_dataset

SHIPPED = ROOT / "data" / "MNIST" / "raw"
MNIST_FILES = idx.ALL_FILES


def test_the_repo_ships_the_four_published_files():
    for name in MNIST_FILES:
        packed = SHIPPED / f"{name}.gz"
        assert packed.is_file(), packed
        idx.read_verified(SHIPPED, name, mnist.FAMILY)  # its content is the published file


@pytest.mark.slow
def test_quick_start_on_a_fresh_clone_without_network_from_any_folder(tmp_path):
    """The README's quick start on a fresh clone with sockets disabled, run from the
    clone and from another folder (the scripts and the Python API find the shipped MNIST
    wherever they run; nothing is written into the data folder)."""
    clone = fresh_clone(tmp_path)
    raw = clone / "data" / "MNIST" / "raw"
    shipped = sorted(p.name for p in raw.iterdir())
    assert shipped == sorted(f"{n}.gz" for n in MNIST_FILES)  # only the .gz are shipped
    guard = offline_guard(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(guard), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()

    def run(*args, cwd=clone):
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)

    probe = run("-c", "import socket; socket.create_connection(('example.org', 80))")
    assert probe.returncode != 0 and "network disabled" in probe.stderr

    # the README's quick start, on a tiny budget
    trained = run("main.py", "--max-steps", 10, "--train-size", 256, "--num-samples", 10, "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert "using --preset cpu" in trained.stdout and "plan:" in trained.stdout
    (run_dir,) = (clone / "runs").iterdir()
    assert (run_dir / "latest.pt").is_file() and (run_dir / "samples_final.png").is_file()

    drawn = run("generate.py", "--num-samples", 10, "--quiet")
    assert drawn.returncode == 0, drawn.stderr
    assert f"drawing from the newest run, {Path('runs') / run_dir.name / 'latest.pt'}" in drawn.stdout
    assert "classes 0-9" in drawn.stdout  # the CPU preset learns the labels
    grid = np.asarray(Image.open(clone / "outputs" / "samples.png"))
    # one row per digit, not blank
    assert grid.shape[:2] == (2 * (10 * 30 + 2), 2 * (1 * 30 + 2)) and grid.std() > 10

    # the same scripts from another folder: its own runs/ and outputs/, the repo's data
    again = run(clone / "main.py", "--max-steps", 2, "--train-size", 64, "--num-samples", 10,
                "--quiet", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert len(list((elsewhere / "runs").iterdir())) == 1 and not (elsewhere / "data").exists()
    # and the README's "Use it from Python", in a notebook outside the repo
    notebook = (f"import sys; sys.path.append({str(clone)!r})\n"
                "from generate import load_model, generate_images\n"
                "import glob\n"
                "model = load_model(glob.glob('runs/*/latest.pt')[0], 'cpu')\n"
                "images = generate_images(model, 4, save_path='grid.png', progress=False)\n"
                "print(tuple(images.shape))\n")
    used = run("-c", notebook, cwd=elsewhere)
    assert used.returncode == 0 and "(4, 1, 28, 28)" in used.stdout, used.stderr
    assert (elsewhere / "grid.png").is_file()
    # a script of scripts/ run as a file, from elsewhere, finds the repo's modules
    helped = run(clone / "scripts" / "classifier.py", "--help", cwd=elsewhere)
    assert helped.returncode == 0 and "--calibrate" in helped.stdout, helped.stderr
    assert sorted(p.name for p in raw.iterdir()) == shipped  # nothing unpacked or left behind


def _data_copy(tmp_path: Path) -> Path:
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(SHIPPED / f"{name}.gz", raw)
    return tmp_path / "data"


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "foreign"])
def test_damaged_gz_files_give_one_line_and_exit_1(capsys, tmp_path, damage):
    data = _data_copy(tmp_path)
    packed = data / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    content = packed.read_bytes()
    if damage == "truncated":
        packed.write_bytes(content[: len(content) // 2])
    elif damage == "corrupt":
        packed.write_bytes(content[:1000] + bytes([content[1000] ^ 0xFF]) + content[1001:])
    else:
        packed.write_bytes(gzip.compress(os.urandom(60_008)))
    err = expect_one_line(capsys, main.main, ["--data-dir", str(data), "--max-steps", "1",
                                              "--quiet", "--checkpoint-dir", str(tmp_path / "o")],
                          code=1)
    assert str(packed) in err and "SHA-256" in err and "git checkout" in err
    assert not (data / "MNIST" / "raw" / "train-labels-idx1-ubyte").exists()


def test_a_truncated_unpacked_file_is_caught_before_training(capsys, tmp_path):
    data = _data_copy(tmp_path)
    packed = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    unpacked = packed.with_suffix("")
    unpacked.write_bytes(gzip.open(packed).read()[:5000])  # where only the unpacked file is
    packed.unlink()
    with pytest.raises(DataDamagedError, match="truncated"):
        open_dataset("mnist", data, download=False).load("test")
    err = expect_one_line(capsys, main.main, ["--data-dir", str(data), "--max-steps", "1",
                                              "--quiet", "--checkpoint-dir", str(tmp_path / "o")],
                          code=1)
    assert str(unpacked) in err and "git checkout" in err


def test_auto_preset_follows_the_device_and_explicit_flags_win():
    on_cpu = Config.from_preset("auto", DEVICE="cpu")
    assert on_cpu.PRESET == "cpu" and on_cpu.MODEL_CHANNELS == PRESETS["cpu"]["MODEL_CHANNELS"]
    assert on_cpu.MAX_MINUTES == 15
    assert Config.from_preset("auto", DEVICE="cuda").PRESET == "none"
    assert Config.from_preset("auto", DEVICE="cuda").MODEL_CHANNELS == 64
    wider = Config.from_preset("auto", DEVICE="cpu", MODEL_CHANNELS=32)
    assert wider.MODEL_CHANNELS == 32 and wider.PREDICTION == "v"
    # an explicit budget replaces the preset's 15 minutes, unless minutes are given too
    assert Config.from_preset("cpu", EPOCHS=50).MAX_MINUTES == 0
    assert Config.from_preset("cpu", MAX_STEPS=10).MAX_MINUTES == 0
    assert Config.from_preset("cpu", EPOCHS=50, MAX_MINUTES=5).MAX_MINUTES == 5
    assert Config.from_preset("none", DEVICE="cpu").MODEL_CHANNELS == 64


def test_epochs_on_a_cpu_say_what_they_will_cost_and_record_the_preset(capsys, tmp_path,
                                                                      data_dir):
    code = main.main(["--epochs", "50", "--max-steps", "3", "--train-size", "256", "--quiet",
                      "--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path / "ck")]
                     + (["--device", "cpu"] if torch.cuda.is_available() else []))
    out = capsys.readouterr().out
    assert code == 0
    assert "using --preset cpu" in out
    plan = next(line for line in out.splitlines() if line.startswith("plan:"))
    assert "3 steps" in plan and "on this machine" in plan
    saved = Config.from_dict(load_checkpoint(tmp_path / "ck" / "latest.pt")["config"])
    assert saved.PRESET == "cpu" and saved.EPOCHS == 50 and saved.MAX_MINUTES == 0


def test_the_designs_functions_work_from_python(tmp_path, tiny):
    from generate import generate_images, generate_interpolation, load_model
    from main import train_model
    from models.diffusion import DiffusionModel

    config = tiny(MAX_STEPS=4)
    model, losses = train_model(config, progress=False, log=quiet)
    assert isinstance(model, DiffusionModel) and not model.training
    assert len(losses) == 4 and all(np.isfinite(losses))
    latest = Path(config.CHECKPOINT_DIR) / "latest.pt"

    loaded = load_model(latest, "cpu")
    assert loaded.config.MODEL_CHANNELS == 8
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # train_model returns the EMA weights, as saved

    grid = tmp_path / "grid.png"
    images = generate_images(loaded, 6, "cpu", save_path=grid, show_images=True,
                             progress=False, seed=3)
    assert images.shape == (6, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert grid.is_file()
    again = generate_images(loaded, 2, "cpu", show_images=False, progress=False, seed=3)
    # image i depends only on (seed, i), up to float rounding: a CPU may pick another
    # convolution kernel for another batch size
    torch.testing.assert_close(again, images[:2], rtol=0, atol=1e-4)

    strip = tmp_path / "interp.png"
    path = generate_interpolation(loaded, 5, "cpu", save_path=strip, pairs=2)
    assert path.shape == (2, 5, 1, 28, 28) and strip.is_file()
    assert not torch.equal(path[0, 0], path[0, -1])


def test_train_model_without_a_config_takes_the_auto_preset(monkeypatch):
    from main import train_model

    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(config, **kwargs):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr("training.run.Trainer", fake_trainer)
    monkeypatch.setattr("training.run.with_run_folders",
                        lambda c, name="": c.replace(CHECKPOINT_DIR="unused", OUTPUT_DIR="unused"))
    monkeypatch.setattr("utils.runs.RunLock.acquire", lambda self: self)
    with pytest.raises(Stop):
        train_model()
    assert seen["config"] == Config.from_preset("auto").replace(CHECKPOINT_DIR="unused",
                                                                OUTPUT_DIR="unused")


def test_digits_before_training_from_the_pretrained_model(capsys, tmp_path, monkeypatch):
    """No runs yet: generate.py draws from the model that ships with the repo and says so;
    --checkpoint pretrained names it; its file is checked by its SHA-256."""
    import generate
    from sampling import pretrained

    monkeypatch.chdir(tmp_path)
    assert generate.main(["--num-samples", "10", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no runs yet: drawing from the pretrained model" in out
    grid = np.asarray(Image.open(tmp_path / "outputs" / "samples.png"))
    assert grid.std() > 10  # digits, not a blank picture
    model = generate.load_model("pretrained", "cpu")
    assert model.config.CONDITIONAL and model.config.PRESET == "cpu"
    changed = tmp_path / "changed.pt"
    data = bytearray(pretrained.WEIGHTS.read_bytes())
    data[len(data) // 2] ^= 1
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "WEIGHTS", changed)
    line = expect_one_line(capsys, generate.main, ["--checkpoint", "pretrained", "--quiet"])
    assert "has SHA-256" in line and "not the recorded" in line
    assert pretrained.WEIGHTS.stat().st_size < 4 * 2 ** 20
