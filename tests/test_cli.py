"""Layer 5: the two scripts as a user runs them, good input and bad."""
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import main
from helpers import TINY_FLAGS as TINY
from helpers import expect_one_line, run_script, start_script, tiny_config, train
from training import trainer as trainer_module
from utils import checkpoint as ckpt
from utils import machine


def run(script, *args, timeout=240):
    return run_script(script, *args, timeout=timeout)


def dirs(tmp_path, data_dir):
    return ["--data-dir", data_dir, "--checkpoint-dir", tmp_path / "ck", "--output-dir",
            tmp_path / "out"]


def test_train_then_generate_end_to_end(tmp_path, data_dir):
    """The scripts' main(), in this process (real processes: the tests below)."""
    assert main.main([*TINY, *map(str, dirs(tmp_path, data_dir)), "--max-steps", "3"]) == 0
    latest = tmp_path / "ck" / "latest.pt"
    assert latest.is_file()
    for name in ("samples_final.png", "loss.png", "loss_history.csv", "config.json"):
        assert (tmp_path / "out" / name).is_file(), name

    out = tmp_path / "gen" / "grid.png"
    assert generate.main([str(a) for a in (
        "--checkpoint", latest, "--output", out, "--num-samples", 6, "--save-npz",
        tmp_path / "gen" / "s.npz", "--seed", 1, "--device", "cpu", "--quiet", "--output-dir",
        tmp_path / "gen")]) == 0
    assert Image.open(out).size[0] > 28
    samples = np.load(tmp_path / "gen" / "s.npz")["samples"]
    assert samples.shape == (6, 28, 28) and samples.dtype == np.uint8

    assert generate.main([str(a) for a in (
        "--checkpoint", latest, "--output", out, "--interpolate", "--num-steps", 4, "--pairs", 2,
        "--interpolate-real", 0, 1, "--inversion-steps", 5, "--chain", "--forward", "--device",
        "cpu", "--quiet", "--data-dir", data_dir, "--no-download", "--output-dir",
        tmp_path / "gen")]) == 0
    strip = Image.open(tmp_path / "gen" / "grid_interpolation.png")
    assert strip.size == (2 * (4 * 30 + 2), 2 * (2 * 30 + 2))  # 4 columns, 2 rows, scaled x2
    for name in ("grid_interpolation_real_0_1.png", "grid_chain.png", "grid_chain.gif",
                 "grid_forward.png"):
        assert (tmp_path / "gen" / name).is_file(), name
    assert Image.open(tmp_path / "gen" / "grid_chain.gif").n_frames > 2


def _expect_exit(capsys, entry, argv, code=2):
    return expect_one_line(capsys, entry, argv, code)


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "0"], "--epochs must be positive, got 0"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--max-steps", "-1"], "--max-steps must be >= 0"),
    (["--timesteps", "0"], "--timesteps must be positive"),
    (["--beta-start", "0.05"], "--beta-start (0.05) must be smaller than --beta-end"),
    (["--beta-end", "1.5"], "--beta-end must lie in (0, 1)"),
    (["--beta-start", "0"], "--beta-start must lie in (0, 1)"),
    (["--schedule", "quadratic"], "argument --schedule: invalid choice: 'quadratic'"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["--timesteps", "10", "--sampling-steps", "20"], "--sampling-steps (20) cannot exceed --timesteps (10)"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must lie in [0, 2^63), got -1"),
    (["--seed", str(2 ** 64)], "--seed must lie in [0, 2^63)"),
    (["--channels", "3"], "--dataset mnist has 28x28 greyscale images"),
    (["--dataset", "folder", "--channels", "2"], "--channels must be 1 (greyscale) or 3"),
    (["--name", "x" * 300], "--name is 300 characters"),
    (["--eval-every", "1", "--eval-samples", "1"], "--eval-samples must be at least 10"),
    (["--preset", "cpu", "--no-conditional", "--clusters", "0", "--guidance", "2"], "--guidance is for a class-conditional"),
    (["--preset", "none", "--class-dropout", "0.2"], "--class-dropout is for a class-conditional"),
    (["--batch-size", "100000"], "--batch-size 100000 exceeds the 60,000 training images"),
    (["--train-size", "64", "--batch-size", "128"], "--batch-size 128 exceeds the 64 training"),
])
def test_main_rejects_bad_settings_in_one_line(capsys, tmp_path, argv, expected):
    err = _expect_exit(capsys, main.main, argv + ["--output-dir", str(tmp_path / "o"),
                                                  "--checkpoint-dir", str(tmp_path / "c")])
    assert expected in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys, tmp_path):
    err = _expect_exit(capsys, main.main, ["--device", "cuda", "--output-dir", str(tmp_path)])
    assert "--device cuda: CUDA is not available" in err
    err = _expect_exit(capsys, generate.main, ["--checkpoint", "x.pt", "--device", "cuda"])
    assert "CUDA is not available" in err


def test_unwritable_output_folder_is_caught_before_training(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = _expect_exit(capsys, main.main, ["--output-dir", str(blocker / "out")])
    assert "--output-dir" in err and "cannot be written" in err
    err = _expect_exit(capsys, generate.main, ["--checkpoint", "x.pt", "--output",
                                               str(blocker / "g.png")])
    assert "--output" in err and "cannot be written" in err


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("ckpt")
    return train(tiny_config(tmp, data_dir, MAX_STEPS=2)).checkpoint_dir / ckpt.LATEST


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "corrupt", "not_ours", "payload",
                                  "text"])
def test_generate_rejects_bad_checkpoints(capsys, tmp_path, small_checkpoint, kind):
    path = tmp_path / "c.pt"
    data = small_checkpoint.read_bytes()
    marker = tmp_path / "payload-ran"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif kind == "corrupt":
        path.write_bytes(data[:100] + bytes(len(data) - 100))
    elif kind == "text":
        path.write_text("hello")
    elif kind == "not_ours":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "payload":
        from test_training import _Payload
        torch.save({"format": ckpt.FORMAT, "config": {}, "model": _Payload(marker), "ema": {}}, path)
    err = _expect_exit(capsys, generate.main, ["--checkpoint", str(path), "--device", "cpu",
                                               "--output", str(tmp_path / "g.png")])
    assert str(path) in err
    assert not marker.exists()
    if kind == "text":
        assert "is not a checkpoint" in err


def test_resume_with_a_different_model_is_refused(capsys, small_checkpoint, tmp_path):
    err = _expect_exit(capsys, main.main, ["--resume", str(small_checkpoint), "--model-channels", "32",
                                           "--output-dir", str(tmp_path)])
    assert "--model-channels 32 does not match the checkpoint (8)" in err


def test_generate_rejects_bad_sampling_requests(capsys, small_checkpoint, tmp_path, data_dir):
    base = ["--checkpoint", str(small_checkpoint), "--device", "cpu", "--output",
            str(tmp_path / "g.png"), "--quiet"]
    err = _expect_exit(capsys, generate.main, base + ["--steps", "51"])
    assert "--steps 51 exceeds the checkpoint's 50 timesteps" in err
    err = _expect_exit(capsys, generate.main, base + ["--sampler", "ddpm", "--steps", "10"])
    assert "--sampler ddpm always takes all 50 steps" in err
    err = _expect_exit(capsys, generate.main, base + ["--num-samples", "0"])
    assert "--num-samples must be positive" in err
    for flags, message in ((["--threads", "-1"], "--threads must be >= 0, got -1"),
                           (["--eta", "nan"], "--eta must be a finite number, got nan"),
                           (["--seed", "-1"], "--seed must lie in [0, 2^63), got -1"),
                           (["--device", "foo"], "--device must be cpu or cuda[:N], got 'foo'"),
                           (["--save-npz", str(tmp_path / "s")], "--save-npz must be a .npz path"),
                           (["--save-npz", str(small_checkpoint / "s.npz")],
                            f"--save-npz {small_checkpoint} cannot be written")):
        assert message in _expect_exit(capsys, generate.main, base + flags)
    err = _expect_exit(capsys, generate.main, base + ["--interpolate-real", "0", "10000",
                                                       "--no-download", "--data-dir", str(data_dir)])
    assert "--interpolate-real 10000" in err


def test_ctrl_c_in_generate_is_one_line(capsys, small_checkpoint, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", interrupted)
    err = _expect_exit(capsys, generate.main, ["--checkpoint", str(small_checkpoint), "--device",
                                               "cpu", "--output", str(tmp_path / "g.png")], code=130)
    assert err.startswith("generate.py: interrupted")


def test_generate_threads_sets_the_cpu_thread_count(small_checkpoint, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert generate.main(["--checkpoint", str(small_checkpoint), "--device", "cpu", "--quiet",
                              "--num-samples", "2", "--output", str(tmp_path / "g.png"),
                              "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def busy_machine(monkeypatch):
    """Two threads by default, and one of two cores busy with another program."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # conftest sets it for the suite
    monkeypatch.setattr(machine, "idle_cores", lambda seconds=0.2: 1.0)
    yield
    torch.set_num_threads(before)


def test_generate_beside_another_program_takes_the_idle_cores_and_says_so(
        busy_machine, small_checkpoint, tmp_path, capsys):
    assert generate.main(["--checkpoint", str(small_checkpoint), "--device", "cpu",
                          "--num-samples", "2", "--output", str(tmp_path / "g.png")]) == 0
    assert torch.get_num_threads() == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("1.0 of ") and "1 thread instead of 2" in first and "--threads" in first


def test_training_beside_another_program_takes_the_idle_cores_and_says_so(busy_machine, tmp_path):
    lines = []
    trainer_module.Trainer(tiny_config(tmp_path), log=lines.append, progress=False)
    assert torch.get_num_threads() == 1
    assert any("1 thread instead of 2" in line for line in lines), lines


def test_the_thread_count_falls_only_when_cores_are_busy_and_nothing_chose_it(
        busy_machine, monkeypatch):
    assert machine.share_cpu(2) is None and torch.get_num_threads() == 2  # --threads 2: as asked
    assert machine.share_cpu(0, "cuda") is None and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert machine.share_cpu() is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(machine, "idle_cores", lambda seconds=0.2: 1.8)  # an idle machine
    assert machine.share_cpu() is None and torch.get_num_threads() == 2
    monkeypatch.setattr(machine, "idle_cores", lambda seconds=0.2: 0.0)  # every core busy
    assert "1 thread" in machine.share_cpu() and torch.get_num_threads() == 1


def test_idle_cores_is_a_count_of_this_machines_cores():
    idle = machine.idle_cores(0.05)
    if not Path("/proc/stat").is_file():
        assert idle is None
    else:
        assert 0 <= idle <= os.cpu_count()


def test_missing_data_names_the_files_and_folder(capsys, tmp_path):
    err = _expect_exit(capsys, main.main, ["--data-dir", str(tmp_path / "nodata"), "--no-download",
                                           "--output-dir", str(tmp_path / "o"), "--checkpoint-dir",
                                           str(tmp_path / "c"), "--quiet"], code=1)
    assert "train-images-idx3-ubyte" in err and "t10k-labels-idx1-ubyte" in err
    assert str((tmp_path / "nodata" / "MNIST" / "raw").resolve()) in err


@pytest.mark.slow
def test_bad_flag_in_a_real_process_prints_no_traceback():
    result = run("main.py", "--epochs", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "main.py: error: --epochs must be positive, got 0"]


def _start_training(tmp_path, data_dir, *extra):
    return start_script("main.py", *TINY, *dirs(tmp_path, data_dir), "--epochs", "100000", *extra)


def _wait_for(condition, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_checkpoint_and_says_how_to_resume(tmp_path, data_dir, sig, code):
    proc = _start_training(tmp_path, data_dir, "--save-every", 1000)
    try:
        assert any(line.startswith("training on cpu") for line in iter(proc.stdout.readline, ""))
        time.sleep(1.0)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    latest = tmp_path / "ck" / "latest.pt"
    assert f"resume with: python main.py --resume {latest}" in err
    assert "Traceback" not in err
    state = ckpt.load_checkpoint(latest)
    assert state["step"] > 0
    for name in ("loss_history.csv", "loss.png", "samples_final.png", "config.json"):
        assert (tmp_path / "out" / name).is_file(), name  # written at the stop, not only at the end
    target = state["step"] + 2
    assert main.main(["--resume", "auto", "--checkpoint-dir", str(tmp_path / "ck"),
                      "--max-steps", str(target), "--quiet", "--no-download", "--data-dir",
                      str(data_dir)]) == 0
    assert ckpt.load_checkpoint(latest)["step"] == target


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data_dir):
    """Kill -9 a run that rewrites latest.pt every step, several times, at random moments."""
    rng = random.Random(0)
    latest = tmp_path / "ck" / "latest.pt"
    steps_seen = []
    for attempt in range(2):
        proc = _start_training(tmp_path, data_dir, "--resume", "auto", "--save-every-steps", 1)
        before = latest.stat().st_mtime_ns if latest.exists() else 0
        assert _wait_for(lambda: latest.exists() and latest.stat().st_mtime_ns != before), \
            proc.stderr.read() if proc.poll() is not None else "no checkpoint written"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait(timeout=30)
        state = ckpt.load_checkpoint(latest)  # never half-written
        steps_seen.append(state["step"])
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]
    assert main.main(["--resume", "auto", "--checkpoint-dir", str(tmp_path / "ck"), "--max-steps",
                      str(steps_seen[-1] + 2), "--quiet", "--no-download", "--data-dir",
                      str(data_dir)]) == 0
    assert ckpt.load_checkpoint(latest)["step"] == steps_seen[-1] + 2
    assert not list((tmp_path / "ck").glob(".*tmp*"))  # stale temporaries cleaned up


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. "
                                                "DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_suggests_a_smaller_batch(capsys, tmp_path, data_dir, monkeypatch, error):
    def no_memory(self):
        raise error

    monkeypatch.setattr(trainer_module.Trainer, "fit", no_memory)
    err = _expect_exit(capsys, main.main, [*TINY, *map(str, dirs(tmp_path, data_dir)),
                                           "--train-size", "4096", "--batch-size", "4096"], code=1)
    assert "out of memory" in err and "--batch-size 4096" in err and "e.g. 2048" in err


def _copy_checkpoint(source, tmp_path, **config_changes):
    state = ckpt.load_checkpoint(source)
    state["config"].update(config_changes)
    path = tmp_path / "ck" / "latest.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def test_resuming_a_finished_run_says_so_and_writes_nothing(capsys, small_checkpoint, tmp_path):
    path = _copy_checkpoint(small_checkpoint, tmp_path)  # trained for its MAX_STEPS = 2
    before = path.stat().st_mtime_ns
    assert main.main(["--resume", str(path), "--quiet", "--checkpoint-dir", str(tmp_path / "ck"),
                      "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "step 2 of 2" in out and "--max-steps" in out
    assert path.stat().st_mtime_ns == before
    assert not [p for p in (tmp_path / "out").glob("*") if p.name != ".lock"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resume_continues_on_this_machine_when_the_runs_device_is_missing(capsys, small_checkpoint,
                                                                          tmp_path):
    """A run trained on a GPU, resumed on a CPU box; a preset given on resume is ignored."""
    path = _copy_checkpoint(small_checkpoint, tmp_path, DEVICE="cuda")
    assert main.main(["--resume", str(path), "--preset", "cpu", "--max-steps", "3", "--quiet",
                      "--checkpoint-dir", str(tmp_path / "ck"),
                      "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "--preset cpu ignored" in out and "continuing on cpu" in out
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 3 and state["config"]["DEVICE"] == "cpu"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_every_flag_passes_through_torchrun():
    """torchrun parses the script's arguments too: a flag that starts one of its own options
    is taken or refused before the script runs (`--log` is ambiguous there, so it has the
    second spelling --logger, the one the torchrun docs use)."""
    from torch.distributed.run import get_args_parser

    theirs = {o for a in get_args_parser()._actions for o in a.option_strings}
    for script in (main, generate):
        flags = {o for a in script.build_parser()._actions for o in a.option_strings}
        clashing = {f for f in flags if any(t.startswith(f) for t in theirs)} - {"-h", "--help"}
        assert clashing <= {"--log"}, (script.__name__, clashing)
        if clashing:
            assert "--logger" in flags
