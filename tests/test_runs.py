"""Nothing lost: run folders, locks, resume targets, a full disk, atomic files, output
names, and every bad input ending in one line."""
import errno
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
import main
import training.logging
import utils.files
from helpers import TINY_FLAGS as TINY
from helpers import expect_one_line, run_script, start_script
from sampling import pretrained
from training.trainer import Trainer
from utils import checkpoint as ckpt
from utils.runs import RunLock, RunLockedError


def run(cwd, script, *args, timeout=240):
    return run_script(script, *args, cwd=cwd, timeout=timeout)


def test_new_runs_get_their_own_folders_and_generate_takes_the_newest(
        capsys, monkeypatch, tmp_path, data_dir):
    monkeypatch.chdir(tmp_path)  # runs/ and outputs/ are relative to where the user stands
    data = ["--data-dir", str(data_dir)]
    assert main.main([*TINY, *data, "--max-steps", "2"]) == 0
    assert main.main([*TINY, *data, "--max-steps", "4", "--name", "quick try"]) == 0
    folders = sorted((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(folders) == 2 and folders[1].name.endswith("-default-quick-try")
    steps = [ckpt.load_checkpoint(f / "latest.pt")["step"] for f in folders]
    assert steps == [2, 4]  # both models kept, each in its own folder with its outputs
    for folder in folders:
        assert (folder / "config.json").is_file() and (folder / "loss_history.csv").is_file()

    capsys.readouterr()
    assert generate.main(["--num-samples", "4", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"drawing from the newest run, {Path('runs') / folders[1].name / 'latest.pt'}" in printed
    assert "(the model that ships with the repo: --checkpoint pretrained)" in printed
    assert main.main(["--resume", "auto", "--max-steps", "5", "--quiet", *data]) == 0
    assert "next: python generate.py   (draws from the newest run" in capsys.readouterr().out
    assert ckpt.load_checkpoint(folders[1] / "latest.pt")["step"] == 5
    assert ckpt.load_checkpoint(folders[0] / "latest.pt")["step"] == 2


def test_a_given_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(
        capsys, tmp_path, data_dir):
    folders = ["--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path / "ck")]
    assert main.main(TINY + folders + ["--max-steps", "2"]) == 0
    err = expect_one_line(capsys, main.main, TINY + folders + ["--max-steps", "3"], code=2)
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    assert ckpt.load_checkpoint(tmp_path / "ck" / "latest.pt")["step"] == 2  # untouched
    assert main.main(TINY + folders + ["--max-steps", "3", "--overwrite"]) == 0
    state = ckpt.load_checkpoint(tmp_path / "ck" / "latest.pt")
    assert state["step"] == 3 and len(state["losses"]) == 3  # a new run, not a continuation


def test_overwrite_never_deletes_under_a_run_that_is_training(capsys, tmp_path, data_dir):
    folder = tmp_path / "ck"
    flags = [*TINY, "--data-dir", str(data_dir), "--checkpoint-dir", str(folder)]
    assert main.main([*flags, "--max-steps", "2"]) == 0
    assert f"next: python generate.py --checkpoint {folder / 'latest.pt'}" in capsys.readouterr().out
    with RunLock(folder):  # another run, training there
        err = expect_one_line(capsys, main.main, [*flags, "--max-steps", "3", "--overwrite"])
    assert "in use by another training run" in err
    assert ckpt.load_checkpoint(folder / "latest.pt")["step"] == 2 and (folder / "config.json").is_file()


def test_lock_refuses_a_second_holder_and_is_released():
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"lock-test-{os.getpid()}"
    with RunLock(folder):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(folder).acquire()
    with RunLock(folder):  # released: free again
        pass


@pytest.mark.slow
def test_a_concurrent_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, data_dir):
    folders = ["--data-dir", data_dir, "--checkpoint-dir", tmp_path / "ck"]
    first = start_script("main.py", *TINY, *folders, "--max-steps", "100000",
                         "--save-every-steps", "1", cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ck" / "latest.pt").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.2)
        second = run(tmp_path, "main.py", *TINY, *folders, "--resume", "auto")
        assert second.returncode == 2
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert "in use by another training run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (tmp_path / "ck" / ".lock").exists()  # left behind by the killed run ...
    step = ckpt.load_checkpoint(tmp_path / "ck" / "latest.pt")["step"]
    third = run(tmp_path, "main.py", *TINY, *folders, "--resume", "auto", "--max-steps", step + 2)
    assert third.returncode == 0, third.stderr  # ... and taken over
    assert ckpt.load_checkpoint(tmp_path / "ck" / "latest.pt")["step"] == step + 2


def _fill_the_disk_on_save(monkeypatch, fail_from: int):
    """torch.save writes part of the file, then the disk is full (from save `fail_from` on)."""
    real_save = ckpt.torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= fail_from:
            Path(f).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)


def test_a_full_disk_is_one_line_exit_1_and_the_previous_checkpoint_survives(
        capsys, monkeypatch, tmp_path, data_dir):
    _fill_the_disk_on_save(monkeypatch, fail_from=3)
    argv = TINY + ["--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path / "ck"),
                   "--max-steps", "10", "--save-every-steps", "2"]
    err = expect_one_line(capsys, main.main, argv, code=1)
    latest = tmp_path / "ck" / "latest.pt"
    assert f"could not save {latest}: no space left on device" in err
    assert "the previous checkpoint at step 4 is intact" in err
    assert f"free space and resume with: python main.py --resume {latest}" in err
    assert ckpt.load_checkpoint(latest)["step"] == 4
    assert not list((tmp_path / "ck").glob(".*.tmp-*"))  # no stale temporary file


def test_torch_reporting_a_failed_write_as_runtime_error_is_named_by_free_space(monkeypatch,
                                                                               tmp_path):
    def save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", save)
    monkeypatch.setattr(utils.files.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20}))
    with pytest.raises(ckpt.SaveError, match="no space left on device \\(1 MB free\\)"):
        ckpt.save_checkpoint({"x": 1}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_picture_that_cannot_be_written_does_not_stop_the_run(monkeypatch, tiny):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(training.logging, "save_images", full)
    messages = []
    trainer = Trainer(tiny(MAX_STEPS=5, EPOCHS=2), progress=False, log=messages.append)
    summary = trainer.fit()
    assert summary["step"] == 5
    warnings = [m for m in messages if m.startswith("warning: could not write the sample grid")]
    assert warnings and "no space left on device; training goes on" in warnings[0]
    assert ckpt.load_checkpoint(Path(trainer.config.CHECKPOINT_DIR) / "latest.pt")["step"] == 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("run")
    assert main.main(TINY + ["--data-dir", str(data_dir), "--checkpoint-dir", str(folder),
                             "--max-steps", "2"]) == 0
    return folder / "latest.pt"


def test_generate_names_are_never_reused_and_a_named_output_is_honoured(
        tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--quiet", "--num-samples", "4"]
    assert generate.main(common) == 0
    assert generate.main(common) == 0
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["samples-2.png",
                                                                        "samples.png"]
    named = tmp_path / "interp.png"
    assert generate.main(common + ["--interpolate", "--num-steps", "3", "--pairs", "1",
                                   "--output", str(named)]) == 0
    assert named.is_file() and not (tmp_path / "interp_interpolation.png").exists()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["samples-2.png",
                                                                        "samples.png"]


def _npz(tmp_path, count):
    path = tmp_path / f"s{count}.npz"
    np.savez(path, samples=np.zeros((count, 28, 28), np.uint8))
    return path


def test_empty_npz_is_one_line(capsys, tmp_path):
    err = expect_one_line(capsys, generate.main, ["--evaluate-npz", str(_npz(tmp_path, 0))], code=2)
    assert "holds 0 samples" in err


def test_generate_without_any_run_says_what_to_do(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrained, "available", lambda: False)
    err = expect_one_line(capsys, generate.main, ["--device", "cpu"], code=2)
    assert "no checkpoint found in runs/" in err and "python main.py" in err
