"""Beyond digits: the dataset seam (one module each, registered once), Fashion-MNIST from
../shared without a network, your own labelled folders (greyscale and colour) trained,
drawn by class name and evaluated with a classifier cached by the data's content, damaged
or empty folders in one line, and MNIST checkpoints of earlier versions unchanged."""
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
from config import Config
from evaluation import classifier as clf
from evaluation.metrics import Evaluator
from helpers import FASHION_DIR, TINY_FLAGS, expect_one_line, quiet, tiny_config, train
from models.diffusion import DiffusionModel
from utils import checkpoint as ckpt
from utils.datasets import REGISTRY, DataDamagedError, open_dataset

needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Fashion-MNIST is not in ../shared/data/fashion-mnist")
SMALL = ["--model-channels", "8", "--time-embed-dim", "16", "--num-res-blocks", "1",
         "--no-attention", "--timesteps", "20", "--sampling-steps", "3", "--device", "cpu",
         "--quiet", "--preset", "none", "--no-download"]


def test_every_registered_dataset_is_a_module_with_the_same_interface():
    for name, module in REGISTRY.items():
        assert module.NAME == name and callable(module.open_dataset)
    assert list(REGISTRY) == ["mnist", "fashion-mnist", "folder"]


@needs_fashion
def test_fashion_mnist_is_read_from_its_folder_and_checked(tmp_path):
    dataset = open_dataset("fashion-mnist", FASHION_DIR, download=False)
    images, labels = dataset.load("test")
    assert images.shape == (10_000, 1, 28, 28) and labels.max() == 9
    assert dataset.class_names[7] == "Sneaker" and dataset.root == FASHION_DIR
    broken = tmp_path / "FashionMNIST" / "raw"
    broken.mkdir(parents=True)
    for f in FASHION_DIR.glob("*.gz"):
        shutil.copy(f, broken)
    data = (broken / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (broken / "t10k-labels-idx1-ubyte.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataDamagedError, match="does not match its published SHA-256"):
        open_dataset("fashion-mnist", tmp_path, download=False)


@needs_fashion
def test_fashion_mnist_trains_and_draws_by_class_name_offline(tmp_path, capsys):
    folder = tmp_path / "run"
    assert main.main([*SMALL, "--dataset", "fashion-mnist", "--data-dir", str(FASHION_DIR),
                      "--conditional", "--max-steps", "2", "--train-size", "64",
                      "--batch-size", "16", "--checkpoint-dir", str(folder)]) == 0
    state = ckpt.load_checkpoint(folder / ckpt.LATEST)
    assert state["config"]["DATASET"] == "fashion-mnist"
    assert state["config"]["CLASS_NAMES"][7] == "Sneaker"
    npz = tmp_path / "s.npz"
    assert generate.main(["--checkpoint", str(folder / ckpt.LATEST), "--class", "Sneaker",
                          "bag", "--num-samples", "4", "--save-npz", str(npz), "--quiet",
                          "--output", str(tmp_path / "g.png")]) == 0
    assert np.load(npz)["labels"].tolist() == [7, 8, 7, 8]
    assert "Sneaker, Bag" in capsys.readouterr().out
    line = expect_one_line(capsys, generate.main, ["--checkpoint", str(folder / ckpt.LATEST),
                                                   "--class", "Sandals", "--quiet"])
    assert "Sandals" in line and "Sandal" in line and "Ankle boot" in line
    assert line.startswith("generate.py: error: --class Sandals")  # the flag as typed


def test_the_sampling_line_names_all_classes_by_their_count():
    from sampling.settings import format_classes
    fashion = Config(DATASET="fashion-mnist", CONDITIONAL=True)
    assert format_classes(fashion, list(range(10))) == "all 10"  # not "classes all classes"
    assert format_classes(fashion, [7, 8]) == "Sneaker, Bag"
    assert format_classes(Config(CONDITIONAL=True), list(range(10))) == "0-9"


def _write_folder(root: Path, classes: dict, size: int = 12, colour: bool = False,
                  per_class: int = 12) -> Path:
    """A small labelled dataset: each class a different bright square position."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            array[2 + k:6 + k, 2:6 + k] = 255
            picture = Image.fromarray(array if colour else array[:, :, 0])
            picture.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.parametrize("colour", [False, True], ids=["greyscale", "colour"])
def test_a_labelled_folder_trains_draws_by_name_and_evaluates(tmp_path, capsys, colour,
                                                              monkeypatch):
    monkeypatch.setattr(clf, "CACHE_DIR", tmp_path / "evaluators")
    data = _write_folder(tmp_path / "shapes", {"circle": 0, "square": 1, "star": 2},
                         colour=colour)
    folder = tmp_path / "run"
    channels = "3" if colour else "1"
    assert main.main([*SMALL, "--dataset", "folder", "--data-dir", str(data), "--channels",
                      channels, "--image-size", "16", "--channel-mult", "1", "2",
                      "--conditional", "--max-steps", "2", "--batch-size", "8",
                      "--checkpoint-dir", str(folder), "--eval-every", "1",
                      "--eval-samples", "12"]) == 0
    config = Config.from_dict(ckpt.load_checkpoint(folder / ckpt.LATEST)["config"])
    assert config.class_names == ("circle", "square", "star") and config.DATASET == "folder"
    out = tmp_path / "gen"
    assert generate.main(["--checkpoint", str(folder / ckpt.LATEST), "--class", "star",
                          "--num-samples", "12", "--evaluate", "--quiet", "--output-dir",
                          str(out), "--output", str(out / "stars.png"), "--save-npz",
                          str(out / "s.npz")]) == 0
    samples = np.load(out / "s.npz")["samples"]
    assert samples.shape == ((12, 16, 16, 3) if colour else (12, 16, 16))
    [result] = [json.loads(p.read_text()) for p in out.glob("eval_*.json")]
    assert result["dataset"] == "folder" and "conditional_accuracy" in result
    assert list((tmp_path / "evaluators").glob("folder-*.pt"))  # trained once, cached
    assert "the class asked for" in capsys.readouterr().out


def test_the_evaluators_cache_follows_the_data(tmp_path):
    data = _write_folder(tmp_path / "d", {"a": 0, "b": 1}, per_class=6)
    before = open_dataset("folder", data, image_size=12)
    first, info = clf.load_or_train(before, tmp_path / "cache", progress=False, log=quiet,
                                    epochs=1)
    again, info_again = clf.load_or_train(open_dataset("folder", data, image_size=12),
                                          tmp_path / "cache", progress=False, log=quiet, epochs=1)
    assert info_again["cached"] and info_again["path"] == info["path"]
    Image.fromarray(np.full((12, 12), 255, np.uint8)).save(data / "a" / "new.png")
    changed = open_dataset("folder", data, image_size=12)
    assert changed.fingerprint != before.fingerprint
    _, info_changed = clf.load_or_train(changed, tmp_path / "cache", progress=False, log=quiet,
                                        epochs=1)
    assert not info_changed["cached"] and info_changed["path"] != info["path"]


def test_a_folder_without_classes_is_one_unconditional_class(tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(data / f"{i}.png")
    dataset = open_dataset("folder", data, image_size=8)
    held, kept = len(dataset.load("test")[0]), len(dataset.load("train")[0])
    assert dataset.class_names == () and held + kept == 20 and 1 <= held <= 6  # about a tenth
    with pytest.raises(Exception, match="--conditional needs a dataset with classes"):
        train(tiny_config(tmp_path, DATASET="folder", DATA_DIR=str(data), IMAGE_SIZE=8,
                          CHANNEL_MULT=(1, 2), CONDITIONAL=True, MAX_STEPS=1, TRAIN_SIZE=0,
                          BATCH_SIZE=4))
    trained = train(tiny_config(tmp_path, DATASET="folder", DATA_DIR=str(data), IMAGE_SIZE=8,
                                CHANNEL_MULT=(1, 2), MAX_STEPS=1, TRAIN_SIZE=0, BATCH_SIZE=4,
                                CHECKPOINT_DIR=str(tmp_path / "ok")))
    # its evaluator tells the four rotations apart, and reports FID without class metrics
    model, info = clf.load_or_train(dataset, tmp_path / "cache", progress=False, log=quiet,
                                    epochs=1)
    evaluator = Evaluator(dataset, progress=False, classifier=(model, info))
    result = evaluator.evaluate(trained.ema.sample((10, 1, 8, 8), steps=3, sampler="ddim"))
    assert info["task"] == "rotations" and "fid" in result and "class_kl" not in result


@pytest.mark.parametrize("case", ["empty", "empty-class", "broken-image", "missing"])
def test_damaged_or_empty_folders_are_one_line(capsys, tmp_path, case):
    data = tmp_path / "d"
    if case != "missing":
        _write_folder(data, {"a": 0, "b": 1}, per_class=4)
    if case == "empty":
        shutil.rmtree(data)
        data.mkdir()
    elif case == "empty-class":
        (data / "c").mkdir()
    elif case == "broken-image":
        (data / "a" / "0.jpg").write_bytes(b"not a picture")
    line = expect_one_line(capsys, main.main, [*SMALL, "--dataset", "folder", "--data-dir",
                                               str(data), "--image-size", "12",
                                               "--channel-mult", "1", "2", "--max-steps", "1",
                                               "--batch-size", "2", "--checkpoint-dir",
                                               str(tmp_path / "ck")], code=1)
    expected = {"empty": "holds no images", "empty-class": "hold no images",
                "broken-image": "cannot be read", "missing": "is not a folder"}[case]
    assert expected in line


def test_a_folder_dataset_needs_a_data_dir(capsys):
    line = expect_one_line(capsys, main.main, [*TINY_FLAGS, "--dataset", "folder"])
    assert "--dataset folder needs --data-dir" in line


def test_an_mnist_checkpoint_of_an_earlier_version_loads_and_draws_the_same(tmp_path, tiny):
    """Checkpoints written before datasets existed lack DATASET and CLASS_NAMES: they are
    MNIST, with digits 0-9, and draw exactly what they drew."""
    trainer = train(tiny(MAX_STEPS=2, CONDITIONAL=True))
    state = ckpt.load_checkpoint(trainer.checkpoint_dir / ckpt.LATEST)
    for key in ("DATASET", "CLASS_NAMES", "LOG"):
        del state["config"][key]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    model, config = DiffusionModel.from_checkpoint(old)
    assert config.DATASET == "mnist" and config.class_names == tuple("0123456789")
    images = generate.generate_images(model, 4, digits=[3], show_images=False, progress=False)
    again = generate.generate_images(trainer.ema, 4, digits=[3], show_images=False,
                                     progress=False)
    assert torch.equal(images, again)
