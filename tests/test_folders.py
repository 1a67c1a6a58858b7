"""Your own folder, trusted: a split that never moves an image, every image mode read for
what it shows, layouts that cannot be misread, a checkpoint checked against the folder it
meets later, and the smaller traps of a first hour (pictures of ten classes of one image,
a file where TensorBoard's folder goes, masks, .npz files that say their dataset)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import main
from evaluation import classifier as clf
from evaluation.npz import recorded_dataset
from helpers import TINY_FLAGS, expect_one_line, quiet, tiny_config, train
from sampling.editing import load_mask
from utils import checkpoint as ckpt
from utils.datasets import open_dataset
from utils.datasets.base import DataMismatchError
from utils.datasets.folder import read_image

SMALL = ["--model-channels", "8", "--time-embed-dim", "16", "--num-res-blocks", "1",
         "--no-attention", "--timesteps", "20", "--sampling-steps", "3", "--device", "cpu",
         "--quiet", "--preset", "none", "--no-download", "--dataset", "folder",
         "--image-size", "8", "--channel-mult", "1", "2"]


def write(root: Path, names: dict[str, int], size: int = 8, start: int = 0) -> Path:
    """`count` small images in root/<name>/ for each name (class k: a bright row k)."""
    for k, (name, count) in enumerate(names.items()):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            array = np.full((size, size), 20, np.uint8)
            array[k % size] = 255
            Image.fromarray(array).save(folder / f"img{i:03d}.png")
    return root


def split_of(dataset) -> dict[str, set]:
    from utils.datasets.folder import scan

    _, files = scan(dataset.root)
    return {s: {f.relative_to(dataset.root).as_posix() for f, _ in files[s]} for s in files}


def test_the_held_out_split_never_moves_an_old_image(tmp_path):
    data = write(tmp_path / "d", {"a": 60, "b": 60})
    before = split_of(open_dataset("folder", data, image_size=8))
    assert 6 <= len(before["test"]) <= 24  # about a tenth
    write(data, {"a": 30, "b": 30}, start=100)  # add images to both classes
    after = split_of(open_dataset("folder", data, image_size=8))
    assert before["test"] <= after["test"] and before["train"] <= after["train"]
    (data / "a" / "img000.png").unlink()  # and removing one moves none either
    again = split_of(open_dataset("folder", data, image_size=8))
    assert again["test"] == after["test"] - {"a/img000.png"}


def test_a_class_of_one_image_is_trained_on(tmp_path):
    data = write(tmp_path / "d", {"many": 40, "single": 1})
    dataset = open_dataset("folder", data, image_size=8)
    _, labels = dataset.load("train")
    assert (labels == 1).sum() == 1  # the single image trains; it is not held out
    assert "held out by a hash" in dataset.split and "training" in dataset.split


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr",
                                  "I", "I;16", "I;16B", "F"])
def test_every_image_mode_reads_as_what_it_shows(tmp_path, mode):
    """A mid-grey square on black, saved in each mode Pillow writes or opens: read back
    as about 128 where it is grey and 0 where it is black (16-bit mid-grey is not white)."""
    grey = np.zeros((8, 8), np.uint8)
    grey[2:6, 2:6] = 128
    if mode == "1":
        grey[2:6, 2:6] = 255
    if mode.startswith("I;16") or mode == "I":  # 16-bit data: mid-grey is 128 * 257
        wide = grey.astype(np.uint16) * 257
        picture = Image.fromarray({"I;16": wide, "I;16B": wide.astype(">u2"),
                                   "I": wide.astype(np.int32)}[mode])
    elif mode == "F":
        picture = Image.fromarray(grey.astype(np.float32) / 255, "F")
    else:
        picture = Image.fromarray(grey, "L").convert(mode if mode not in ("LA", "PA", "RGBA")
                                                     else mode.replace("A", "") or "L")
        if mode.endswith("A"):
            picture = picture.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "YCbCr", "I;16B", "F", "I") else "x.png")
    try:
        picture.save(path)
    except (OSError, KeyError, ValueError):
        path = tmp_path / "x.tiff"
        picture.save(path)
    array = read_image(path, 1, 8)[0].astype(int)
    expected = 255 if mode == "1" else 128
    assert abs(array[3, 3] - expected) <= 3, (mode, Image.open(path).mode, array[3, 3])
    assert array[0, 0] <= 3, (mode, array[0, 0])
    colour = read_image(path, 3, 8)
    assert colour.shape == (3, 8, 8) and abs(int(colour[0, 3, 3]) - expected) <= 3


def test_transparency_is_composited_onto_white_and_odd_colour_spaces_are_refused(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # black strokes on a transparent background
    rgba[2:6, 2:6] = (0, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    array = read_image(tmp_path / "t.png", 1, 8)[0]
    assert array[0, 0] == 255 and array[3, 3] == 0
    Image.new("RGB", (8, 8)).convert("LAB").save(tmp_path / "lab.tiff")
    with pytest.raises(Exception, match="LAB colour space"):
        read_image(tmp_path / "lab.tiff", 1, 8)


@pytest.mark.parametrize("case", ["class-named-test", "class-named-train", "train-beside-classes",
                                  "test-class-unknown"])
def test_layouts_that_could_be_misread_are_one_line(tmp_path, capsys, case):
    data = write(tmp_path / "d", {"cats": 5, "dogs": 5})
    if case == "class-named-test":
        write(data, {"test": 5})  # images straight in test/: a class, or a split?
    elif case == "class-named-train":
        write(data, {"train": 5})
    elif case == "train-beside-classes":
        write(data / "train", {"cats": 5})
    else:
        write(data / "test", {"cats": 2, "birds": 2})
    line = expect_one_line(capsys, main.main, [*SMALL, "--data-dir", data, "--max-steps", "1",
                                               "--batch-size", "2", "--checkpoint-dir",
                                               tmp_path / "ck"], code=1)
    assert {"class-named-test": "could be a class or the test split",
            "class-named-train": "could be a class or the train split",
            "train-beside-classes": "both train/ and class folders",
            "test-class-unknown": "classes that training lacks: birds"}[case] in line


def test_proper_splits_are_read(tmp_path):
    data = write(tmp_path / "d", {"cats": 6, "dogs": 6})
    write(data / "test", {"cats": 2, "dogs": 2})
    dataset = open_dataset("folder", data, image_size=8)
    assert dataset.class_names == ("cats", "dogs") and len(dataset.load("test")[0]) == 4
    assert f"test split: {data / 'test'}" in dataset.split
    nested = write(tmp_path / "n" / "train", {"cats": 4, "dogs": 4})
    write(nested.parent / "test", {"cats": 1, "dogs": 1})
    dataset = open_dataset("folder", nested.parent, image_size=8)
    assert dataset.class_names == ("cats", "dogs") and len(dataset.load("train")[0]) == 8


@pytest.mark.slow
def test_a_checkpoint_meets_only_its_own_classes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(clf, "CACHE_DIR", tmp_path / "evaluators")
    data = write(tmp_path / "d", {"cats": 12, "dogs": 12})
    run = tmp_path / "run"
    assert main.main([str(a) for a in [*SMALL, "--data-dir", data, "--conditional",
                                       "--max-steps", "2", "--batch-size", "4",
                                       "--checkpoint-dir", run]]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["CLASS_NAMES"] == ["cats", "dogs"] and config["DATA_FINGERPRINT"]
    assert Path(config["DATA_DIR"]).is_absolute()
    latest = run / ckpt.LATEST
    samples = tmp_path / "s.npz"
    assert generate.main([str(a) for a in ["--checkpoint", latest, "--num-samples", "10",
                                           "--save-npz", samples, "--output", tmp_path / "g.png",
                                           "--quiet"]]) == 0
    assert recorded_dataset(samples)["class_names"] == ("cats", "dogs")
    (data / "dogs").rename(data / "zebras")  # the classes change order and name
    capsys.readouterr()
    for argv in (["--checkpoint", latest, "--evaluate-npz", samples],
                 ["--checkpoint", latest, "--evaluate", "--num-samples", "10"],
                 ["--evaluate-npz", samples]):  # the file records its folder and classes
        line = expect_one_line(capsys, generate.main, [str(a) for a in argv + ["--quiet"]],
                               code=1)
        assert "(cats, zebras)" in line and "(cats, dogs)" in line, line
    line = expect_one_line(capsys, main.main, [str(a) for a in [
        "--resume", latest, "--max-steps", "3", "--quiet"]], code=1)
    assert "(cats, zebras)" in line and "(cats, dogs)" in line
    (data / "zebras").rename(data / "dogs")
    write(data, {"cats": 2}, start=50)  # the same classes, more images: a note, and it goes on
    assert main.main([str(a) for a in ["--resume", latest, "--max-steps", "3", "--quiet"]]) == 0
    assert "has changed since the run being resumed was trained" in capsys.readouterr().out


def test_an_npz_without_its_dataset_says_it_is_scored_as_mnist(tmp_path, capsys, data_dir,
                                                              shared_evaluator):
    path = tmp_path / "old.npz"
    rng = np.random.default_rng(0)
    np.savez(path, samples=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    assert generate.main(["--evaluate-npz", str(path), "--quiet", "--output-dir",
                          str(tmp_path)]) == 0
    assert "does not say what its samples are of" in capsys.readouterr().out


def test_ten_classes_and_ten_samples_draw_a_labelled_grid(tmp_path):
    data = write(tmp_path / "d", {f"c{k}": 3 for k in range(10)})
    trainer = train(tiny_config(tmp_path, DATASET="folder", DATA_DIR=str(data), IMAGE_SIZE=8,
                                CHANNEL_MULT=(1, 2), CONDITIONAL=True, MAX_STEPS=2,
                                TRAIN_SIZE=0, BATCH_SIZE=4, NUM_SAMPLES=10, EPOCHS=1))
    assert (Path(trainer.config.OUTPUT_DIR) / "samples_final.png").is_file()


def test_a_file_where_tensorboard_writes_is_one_line(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tb").write_text("my notes")
    line = expect_one_line(capsys, main.main, [*TINY_FLAGS, "--max-steps", "1", "--log",
                                               "tensorboard", "--checkpoint-dir", str(run),
                                               "--overwrite"], code=2)
    assert "a file has that name" in line and (run / "tb").read_text() == "my notes"


def test_masks_that_hide_nothing_or_everything_and_transparent_masks(tmp_path):
    white = np.full((8, 8), 255, np.uint8)
    Image.fromarray(white).save(tmp_path / "white.png")
    Image.fromarray(white * 0).save(tmp_path / "black.png")
    with pytest.raises(Exception, match="hides nothing"):
        load_mask(tmp_path / "white.png", 8)
    with pytest.raises(Exception, match="hides every pixel"):
        load_mask(tmp_path / "black.png", 8)
    rgba = np.full((8, 8, 4), 255, np.uint8)  # white everywhere, the top half transparent
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    mask = load_mask(tmp_path / "alpha.png", 8)
    assert mask[0, 0, :4].sum() == 0 and mask[0, 0, 4:].min() == 1


def test_the_folder_classifier_keeps_to_the_threads_it_is_given(tmp_path, monkeypatch):
    data = write(tmp_path / "d", {"a": 6, "b": 6})
    seen = []
    real = clf.train_classifier

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(clf, "train_classifier", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, info = clf.load_or_train(open_dataset("folder", data, image_size=8), tmp_path / "c",
                                    progress=False, log=quiet, epochs=1)
    finally:
        torch.set_num_threads(threads)
    assert seen == [1] and info["threads"] == 1


def test_the_plan_names_the_data(tmp_path):
    from training.trainer import Trainer

    data = write(tmp_path / "d", {"cats": 30, "dogs": 30})
    trainer = Trainer(tiny_config(tmp_path, DATASET="folder", DATA_DIR=str(data), IMAGE_SIZE=8,
                                  CHANNEL_MULT=(1, 2), CONDITIONAL=True, MAX_STEPS=1,
                                  TRAIN_SIZE=0, BATCH_SIZE=4), progress=False, log=quiet)
    line = trainer.plan().splitlines()[0]
    train_count, test_count = (len(trainer.dataset.load(s)[0]) for s in ("train", "test"))
    assert line.startswith(f"data: folder {data}, {train_count:,} training and {test_count:,} test")
    assert "held out by a hash of each file's path" in line
    assert "2 classes (cats, dogs), learned (--conditional)" in line


def test_a_folders_floor_is_held_out_from_its_classifier_at_the_samples_count(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(clf, "CACHE_DIR", tmp_path / "evaluators")
    data = write(tmp_path / "d", {"cats": 40, "dogs": 40})
    trainer = train(tiny_config(tmp_path, DATASET="folder", DATA_DIR=str(data), IMAGE_SIZE=8,
                                CHANNEL_MULT=(1, 2), CONDITIONAL=True, MAX_STEPS=1,
                                TRAIN_SIZE=0, BATCH_SIZE=4))
    dataset = open_dataset("folder", data, image_size=8)
    held = clf.floor_index(dataset)
    seen = []
    real = clf.train_classifier
    monkeypatch.setattr(clf, "train_classifier",
                        lambda images, *a, **k: (seen.append(images.clone()), real(images, *a, **k))[1])
    train_images = dataset.load("train")[0]
    assert generate.main([str(a) for a in ["--checkpoint", trainer.checkpoint_dir / ckpt.LATEST,
                                           "--evaluate", "--quiet", "--output-dir", tmp_path / "o",
                                           "--output", tmp_path / "g.png"]]) == 0
    out = capsys.readouterr().out
    # the classifier trained on the training images but the held-out ones ...
    kept = torch.ones(len(train_images), dtype=torch.bool)
    kept[held] = False
    assert 0 < len(held) < len(train_images) and torch.equal(seen[0], train_images[kept])
    # ... the draw is as large as the floor, and the report says what the floor is
    assert f"evaluating {len(held)} samples: as many as the real images of the floor" in out
    assert "evaluation: 1 draw(s) of" in out and "on this machine" in out
    assert f"real images{'':<17}{len(held):>10}   (held-out training images (not seen by the classifier))" in out
