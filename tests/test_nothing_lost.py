"""Nothing lost, part 3: the data-loss paths of an adversarial pass, each reproduced, and
the bad inputs that once ended in a traceback (one test per case; each failed before)."""
import errno
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
import main
import utils.files
from helpers import TINY_FLAGS as TINY
from helpers import expect_one_line
from training import trainer as trainer_module
from utils import checkpoint as ckpt
from utils.datasets import idx
from utils.runs import RunLock, newest_checkpoint


def _train_into(folder: Path, data_dir, steps: int, *extra) -> Path:
    assert main.main([*TINY, "--data-dir", str(data_dir), "--checkpoint-dir", str(folder),
                      "--max-steps", str(steps), *map(str, extra)]) == 0
    return folder / ckpt.LATEST


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    """Two finished tiny runs, A (seed 0) and B (seed 1), each in its own folder."""
    root = tmp_path_factory.mktemp("runs")
    return (_train_into(root / "A", data_dir, 2),
            _train_into(root / "B", data_dir, 2, "--seed", "1"))


def test_1_resuming_into_another_runs_checkpoint_folder_is_refused(capsys, two_runs, tmp_path):
    a, b = two_runs
    before = _snapshot(b.parent)
    err = expect_one_line(capsys, main.main, ["--resume", a, "--checkpoint-dir", b.parent,
                                              "--max-steps", "8", "--quiet"])
    assert f"--checkpoint-dir {b.parent}" in err and "not this run's" in err
    assert _snapshot(b.parent) == before


def test_2_resuming_with_an_output_folder_of_another_run_is_refused(capsys, two_runs):
    a, b = two_runs
    before = _snapshot(b.parent)
    err = expect_one_line(capsys, main.main, ["--resume", a, "--output-dir", b.parent,
                                              "--max-steps", "8", "--quiet"])
    assert f"--output-dir {b.parent}" in err
    assert _snapshot(b.parent) == before
    assert ckpt.load_checkpoint(a)["config"]["OUTPUT_DIR"] == str(a.parent)  # nothing stored


def test_3_a_checkpoint_beside_someone_elses_files_continues_in_a_new_run_folder(
        capsys, two_runs, tmp_path, monkeypatch):
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    shutil.copy(two_runs[0], downloads / "downloaded.pt")
    (downloads / "config.json").write_text('{"my": "own settings"}')
    (downloads / "loss_history.csv").write_text("my,own,numbers\n")
    before = _snapshot(downloads)
    monkeypatch.chdir(tmp_path)
    assert main.main(["--resume", str(downloads / "downloaded.pt"), "--max-steps", "3",
                      "--quiet"]) == 0
    assert "in a new run folder" in capsys.readouterr().out
    assert _snapshot(downloads) == before
    [folder] = (tmp_path / "runs").iterdir()
    assert ckpt.load_checkpoint(folder / ckpt.LATEST)["step"] == 3


def test_4_overwrite_takes_the_lock_of_the_output_folder_too(capsys, two_runs, tmp_path):
    b = two_runs[1]
    before = _snapshot(b.parent)
    with RunLock(b.parent):  # run B trains there
        err = expect_one_line(capsys, main.main, [*TINY, "--overwrite", "--output-dir", b.parent,
                                                  "--checkpoint-dir", tmp_path / "new",
                                                  "--max-steps", "1"])
    assert "in use by another training run" in err
    assert _snapshot(b.parent) == before


def _fail_writes_with_enospc(monkeypatch, module, name):
    real = getattr(module, name)

    def partial_then_full(*args, **kwargs):
        target = args[0]
        if hasattr(target, "write"):
            target.write(b"\0" * 4096)
        else:
            Path(target).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, name, partial_then_full)
    return real


def test_6_save_npz_replaces_a_file_whole_or_not_at_all(capsys, two_runs, tmp_path, monkeypatch):
    npz = tmp_path / "s.npz"
    base = ["--checkpoint", two_runs[0], "--num-samples", "3", "--quiet", "--device", "cpu",
            "--output", tmp_path / "g.png"]
    assert generate.main([*map(str, base), "--save-npz", str(npz)]) == 0
    first = npz.read_bytes()
    assert generate.main([*map(str, base), "--save-npz", str(npz), "--seed", "5"]) == 0
    assert "replaced" in capsys.readouterr().out and npz.read_bytes() != first
    second = npz.read_bytes()
    _fail_writes_with_enospc(monkeypatch, np, "savez_compressed")
    err = expect_one_line(capsys, generate.main, [*base, "--save-npz", npz, "--seed", "6"], code=1)
    assert f"could not save {npz}: no space left on device" in err
    assert npz.read_bytes() == second and sorted(p.name for p in tmp_path.iterdir()
                                                 if p.suffix == ".npz" or ".tmp" in p.name) == ["s.npz"]


def test_7_results_are_printed_before_the_json_that_cannot_be_written(
        capsys, two_runs, tmp_path, monkeypatch, shared_evaluator):
    _fail_writes_with_enospc(monkeypatch, Path, "write_text")
    code = generate.main(["--checkpoint", str(two_runs[0]), "--evaluate", "--num-samples", "20",
                          "--quiet", "--output-dir", str(tmp_path / "eval"), "--output",
                          str(tmp_path / "g.png")])
    out, err = capsys.readouterr()
    assert code == 1 and "FID" in out and "metrics written" not in out
    assert len(err.strip().splitlines()) == 1 and "no space left on device" in err
    assert not list((tmp_path / "eval").glob("*.json"))  # not even an empty one


def test_8_non_finite_weights_are_refused_at_load(capsys, two_runs, tmp_path):
    state = ckpt.load_checkpoint(two_runs[0])
    name = next(iter(state["ema"]))
    state["ema"][name] = state["ema"][name] * float("nan")
    broken = tmp_path / "nan.pt"
    torch.save(state, broken)
    err = expect_one_line(capsys, generate.main, ["--checkpoint", broken, "--save-npz",
                                                  tmp_path / "s.npz", "--quiet"])
    assert str(broken) in err and "non-finite weights" in err
    assert not (tmp_path / "s.npz").exists()


def test_9_resuming_an_older_checkpoint_never_moves_latest_backwards(capsys, tmp_path, data_dir,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    latest = _train_into(tmp_path / "X", data_dir, 6, "--save-every", "1")  # epoch 1: step 4
    older = tmp_path / "X" / "epoch_0001.pt"
    assert ckpt.load_checkpoint(older)["step"] == 4
    capsys.readouterr()
    assert main.main(["--resume", str(older), "--max-steps", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "in a new run folder" in out and "move it backwards" in out
    assert ckpt.load_checkpoint(latest)["step"] == 6  # untouched
    [fork] = (tmp_path / "runs").iterdir()
    assert ckpt.load_checkpoint(fork / ckpt.LATEST)["step"] == 5


def test_10_the_newest_run_counts_without_its_latest_pt(tmp_path, data_dir):
    old = _train_into(tmp_path / "runs" / "old", data_dir, 2)
    new = _train_into(tmp_path / "runs" / "new", data_dir, 4, "--save-every", "1")
    new.unlink()  # only epoch_0001.pt is left
    os.utime(old, (1, 1))
    assert newest_checkpoint(tmp_path / "runs", also=()) == new.parent / "epoch_0001.pt"


@pytest.mark.parametrize("damage", ["zeroed-pixels", "labels-of-200"])
def test_11_damaged_content_with_the_right_size_and_header_is_one_line(capsys, tmp_path, damage):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in idx.ALL_FILES:
        shutil.copy(Path(__file__).parents[1] / "data" / "MNIST" / "raw" / f"{name}.gz", raw)
    name = "train-images-idx3-ubyte" if damage == "zeroed-pixels" else "train-labels-idx1-ubyte"
    content = bytearray(gzip.open(raw / f"{name}.gz").read())
    content[16 if damage == "zeroed-pixels" else 8:] = bytes(len(content) - (16 if damage ==
                                                                           "zeroed-pixels" else 8))
    if damage == "labels-of-200":
        content[8:] = bytes([200]) * (len(content) - 8)
    (raw / f"{name}.gz").unlink()
    (raw / name).write_bytes(bytes(content))  # unpacked, same size and header
    err = expect_one_line(capsys, main.main, ["--data-dir", tmp_path / "data", "--max-steps", "1",
                                              "--quiet", "--checkpoint-dir", tmp_path / "o"], code=1)
    assert str(raw / name) in err and "SHA-256" in err


def test_12_pixels_of_only_0_and_1_are_refused(capsys, tmp_path):
    path = tmp_path / "binary.npz"
    np.savez(path, samples=np.random.default_rng(0).integers(0, 2, (50, 28, 28)).astype(np.uint8))
    err = expect_one_line(capsys, generate.main, ["--evaluate-npz", path])
    assert "0 or 1" in err and "255" in err


@pytest.mark.parametrize("kind", ["one", "two", "npy", "empty-file"])
def test_npz_files_that_cannot_be_scored_are_one_line(capsys, tmp_path, kind):
    path = tmp_path / "s.npz"
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28)).astype(np.uint8)
    if kind in ("one", "two"):
        np.savez(path, samples=images[:1 if kind == "one" else 2])
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, images)
    else:
        path.write_bytes(b"")
    err = expect_one_line(capsys, generate.main, ["--evaluate-npz", path])
    assert str(path) in err or "at least 10" in err


def test_an_evaluation_that_fails_never_costs_the_training(tiny, monkeypatch):
    class Broken:
        def __init__(self, *args, **kwargs):
            pass

        def evaluate(self, *args, **kwargs):
            raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(trainer_module, "Evaluator", Broken)
    messages = []
    trainer = trainer_module.Trainer(tiny(EPOCHS=2, EVAL_EVERY=1, EVAL_SAMPLES=10),
                                     progress=False, log=messages.append)
    trainer.fit()
    assert any(m.startswith("warning: the evaluation at step 4 failed (LinAlgError") for m in messages)
    assert ckpt.load_checkpoint(trainer.checkpoint_dir / ckpt.LATEST)["step"] == 8


def test_a_full_disk_while_writing_the_picture_is_one_line(capsys, two_runs, tmp_path, monkeypatch):
    import PIL.Image

    picture = tmp_path / "g.png"
    picture.write_bytes(b"an older picture")

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PIL.Image.Image, "save", full)
    err = expect_one_line(capsys, generate.main, ["--checkpoint", two_runs[0], "--num-samples",
                                                  "2", "--quiet", "--output", picture], code=1)
    assert f"could not save {picture}" in err and picture.read_bytes() == b"an older picture"


def test_more_samples_than_memory_is_refused_before_sampling(capsys, two_runs, tmp_path):
    err = expect_one_line(capsys, generate.main, ["--checkpoint", two_runs[0], "--quiet",
                                                  "--num-samples", "1000000000000",
                                                  "--output", tmp_path / "g.png"])
    assert "--num-samples 1,000,000,000,000 needs about" in err and "ask for fewer" in err


def test_reading_the_data_writes_nothing_into_its_folder(tmp_path, data_dir):
    from utils.datasets import open_dataset

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in idx.ALL_FILES:
        shutil.copy(data_dir / "MNIST" / "raw" / f"{name}.gz", raw)
    open_dataset("mnist", tmp_path, download=False).load("test")
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in idx.ALL_FILES)


def test_an_output_in_another_folder_does_not_need_a_writable_working_folder(
        capsys, two_runs, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    blocked = tmp_path / "cwd-is-a-file-parent"
    blocked.mkdir()
    (blocked / "outputs").write_text("a file where outputs/ would go")
    monkeypatch.chdir(blocked)
    assert generate.main(["--checkpoint", str(two_runs[0]), "--num-samples", "2", "--quiet",
                          "--output", str(elsewhere / "g.png")]) == 0
    assert (elsewhere / "g.png").is_file()


def test_files_module_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    _fail_writes_with_enospc(monkeypatch, Path, "write_text")
    with pytest.raises(utils.files.SaveError, match="no space left on device"):
        utils.files.save_json({"a": 1}, target)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_at_once_leaves_no_folders_behind(capsys, tmp_path, monkeypatch):
    """Missing data: one line, and neither the run's folder nor an empty runs/ stays."""
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    line = expect_one_line(capsys, main.main, [*TINY, "--dataset", "fashion-mnist", "--data-dir",
                                               empty, "--no-download", "--max-steps", 1], code=1)
    assert "Fashion-MNIST not found" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nothing_here"]


def test_two_draws_started_together_never_share_a_picture_name(tmp_path, monkeypatch, two_runs):
    """The free name is claimed atomically (exclusive create) when it is chosen: a second
    process choosing before the first has written gets the next name, not the same one;
    a draw that fails leaves no empty claimed file behind."""
    from sampling.jobs import JOBS, picture_paths

    monkeypatch.chdir(tmp_path)
    args = generate.build_parser().parse_args(["--chain"])
    jobs = [job for job in JOBS if job.wanted(args)]
    first, second = picture_paths(args, jobs), picture_paths(args, jobs)
    assert first["chain"] != second["chain"] and first["chain_gif"] != second["chain_gif"]
    assert {p.name for p in second.values()} == {"samples-2_chain.png", "samples-2_chain.gif"}
    utils.files.release_unwritten()
    assert not list((tmp_path / "outputs").iterdir())  # nothing drawn: nothing left
    path = utils.files.unused(tmp_path / "eval.json")
    assert utils.files.unused(tmp_path / "eval.json").name == "eval-2.json" and path.exists()
    utils.files.release_unwritten()
    assert generate.main(["--checkpoint", str(two_runs[0]), "--quiet", "--num-samples", "4"]) == 0
    assert generate.main(["--checkpoint", str(two_runs[0]), "--quiet", "--num-samples", "4"]) == 0
    written = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert written == ["samples-2.png", "samples.png"]
    assert all(p.stat().st_size > 0 for p in (tmp_path / "outputs").iterdir())
    # --output-dir names the folder of the pictures as of the JSON
    assert generate.main(["--checkpoint", str(two_runs[0]), "--quiet", "--num-samples", "4",
                          "--output-dir", "mine"]) == 0
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["samples.png"]
    assert len(list((tmp_path / "outputs").iterdir())) == 2
