"""torchrun on the CPU (gloo): the mathematics does not depend on the number of
processes, rank 0 alone writes, resume works across process counts, sampling splits
across processes, and Ctrl-C / SIGTERM ends with one saved checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT
from utils import checkpoint as ckpt

TINY = ["--model-channels", "8", "--time-embed-dim", "16", "--num-res-blocks", "1",
        "--timesteps", "50", "--train-size", "64", "--sampling-steps", "5", "--num-samples", "4",
        "--device", "cpu", "--no-download", "--quiet", "--preset", "none", "--threads", "1",
        "--dropout", "0"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="this torch has no torch.distributed"),
              pytest.mark.slow]


def launch(cwd, processes, script, *args, timeout=240):
    """`torchrun --standalone --nproc_per_node N script args` (N = 0: plain python)."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes)] if processes else [sys.executable])
    return subprocess.run([*runner, str(ROOT / script), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def weights(path):
    return ckpt.load_checkpoint(path)["model"]


def assert_same_weights(a, b, atol=1e-5):
    """Equal up to the order of floating-point sums (gloo's all-reduce against one batch's
    sum; another CPU may pick other kernels): not bit for bit."""
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_processes_train_like_one_and_resume_on_another_count(tmp_path, data_dir):
    """2 processes of 8 train the same weights as 1 of 16 (up to the order of sums); rank 0
    alone writes (TensorBoard too) and talks, and evaluates inside the 2-process run without hanging; a run
    begun on 2 processes resumes on 1 and back, with the weights of one unbroken run."""
    common = [*TINY, "--data-dir", data_dir, "--batch-size", 16]
    straight = launch(tmp_path, 0, "main.py", *common, "--max-steps", 7, "--checkpoint-dir", "s")
    assert straight.returncode == 0, straight.stderr
    begun = {}
    for first, then in ((2, 0), (0, 2)):  # begun on 2 processes, resumed on 1; and back
        folder = tmp_path / f"r{first}{then}"
        extra = ["--eval-every", 1, "--eval-samples", 24, "--logger", "tensorboard"] \
            if first == 2 else []
        begun[first] = launch(tmp_path, first, "main.py", *common, "--max-steps", 3,
                              "--checkpoint-dir", folder, *extra)
        assert begun[first].returncode == 0, begun[first].stderr
        if first == 2:  # rank 0 alone writes TensorBoard events: one file
            assert len(list((folder / "tb").glob("events.out.tfevents*"))) == 1
        begun[first] = ckpt.load_checkpoint(folder / "latest.pt")
        resumed = launch(tmp_path, then, "main.py", "--resume", folder / "latest.pt",
                         "--max-steps", 7, "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming" in resumed.stdout and "at step 3" in resumed.stdout
        state = ckpt.load_checkpoint(folder / "latest.pt")
        assert state["step"] == 7
        # the same data order and noise from step 3 on: the same weights as one unbroken run
        assert_same_weights(weights(tmp_path / "s" / "latest.pt"), state["model"])
        assert [s["world_size"] for s in state["stretches"]] == [first or 1, then or 1]
        assert [s["step"] for s in state["stretches"]] == [0, 3]
    # after 3 steps, 2 processes and 1 hold the same weights and losses
    assert_same_weights(begun[2]["model"], begun[0]["model"])
    assert torch.allclose(begun[2]["losses"], begun[0]["losses"], atol=1e-5)
    evaluation = begun[2]["evaluations"][-1]  # inside the 2-process run: no hang, one record
    assert evaluation["num_samples"] == 24 and np.isfinite(evaluation["fid"])
    assert len(begun[2]["evaluations"]) == 1
    config = json.loads((tmp_path / "r20" / "config.json").read_text())
    assert config["world_size"] == 1 and config["stretches"][0] == {"step": 0, "world_size": 2}


def test_sampling_splits_across_processes_and_gathers_the_same_digits(tmp_path, data_dir):
    trained = launch(tmp_path, 0, "main.py", *TINY, "--data-dir", data_dir, "--batch-size", 16,
                     "--max-steps", 2, "--checkpoint-dir", "ck")
    assert trained.returncode == 0, trained.stderr
    common = ["--checkpoint", tmp_path / "ck" / "latest.pt", "--num-samples", 7, "--device", "cpu",
              "--quiet", "--eta", 1, "--batch-size", 3]
    for processes, name in ((0, "one"), (2, "two")):
        result = launch(tmp_path, processes, "generate.py", *common, "--save-npz", f"{name}.npz",
                        "--output", f"{name}.png")
        assert result.returncode == 0, result.stderr
    one, two = (np.load(tmp_path / f"{n}.npz")["samples"] for n in ("one", "two"))
    assert one.shape == two.shape == (7, 28, 28)
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1  # image i: (seed, i) alone
    assert not (tmp_path / "two-2.png").exists()  # written once, by rank 0


def test_sigterm_to_a_two_process_run_saves_once_and_says_how_to_resume(tmp_path, data_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main.py"), *map(str, TINY), "--data-dir", str(data_dir), "--batch-size", "16",
         "--epochs", "100000", "--save-every", "100000", "--checkpoint-dir", "ck"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.startswith("training on cpu") for line in lines)
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both processes
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    latest = tmp_path / "ck" / "latest.pt"
    assert f"resume with: python main.py --resume {Path('ck') / 'latest.pt'}" in err
    assert err.count("resume with:") == 1  # said once, by rank 0
    assert ckpt.load_checkpoint(latest)["step"] > 0  # resuming it: the test above


def test_the_process_group_joins_on_the_runs_own_device(tmp_path, data_dir, monkeypatch):
    """The backend (gloo or nccl) follows the device the run trains on, not the machine's
    default: --preset cpu on a GPU machine joins with gloo."""
    import main
    from utils import distributed as dist

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("config.default_device", lambda: "cuda")  # as on a GPU machine
    monkeypatch.setattr(dist, "init", joined.append)
    flags = list(TINY)
    del flags[flags.index("--device"):flags.index("--device") + 2]  # the device left to the run
    assert main.main([*flags, "--preset", "cpu", "--data-dir", str(data_dir), "--max-steps", "1",
                      "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    assert joined == ["cpu"]


def test_benchmark_under_torchrun_reports_global_speed_and_scaling(tmp_path, data_dir):
    result = launch(tmp_path, 2, "main.py", *TINY, "--data-dir", data_dir, "--batch-size", 32,
                    "--benchmark", "--output-dir", "bench")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert data["world_size"] == 2 and data["single_process_images_per_s"] > 0
    assert data["scaling_efficiency"] == pytest.approx(
        data["train_images_per_s"] / (2 * data["single_process_images_per_s"]))
    assert result.stdout.count("scaling efficiency") == 1


def _worker_of_rank(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with RANK=rank (Linux /proc)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_dying_process_leaves_the_last_checkpoint_and_a_clear_message(tmp_path, data_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "main.py"), *map(str, TINY), "--data-dir", str(data_dir), "--batch-size", "16",
         "--epochs", "100000", "--save-every-steps", "5", "--checkpoint-dir", "ck"],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = tmp_path / "ck" / "latest.pt"
    try:
        deadline = time.time() + 120
        while not latest.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.2)
        os.kill(_worker_of_rank(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "main.py: error: (rank 0) lost contact with the other processes" in err
    assert "the last good checkpoint is in ck" in err
    assert ckpt.load_checkpoint(latest)["step"] >= 5  # the last good one, intact
