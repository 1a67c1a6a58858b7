"""MNIST (Yann LeCun, Corinna Cortes and Christopher J.C. Burges; CC BY-SA 3.0): 60,000
training and 10,000 test digits, 28x28 greyscale, ten classes. The default dataset, and
the one that ships with the repo: data/MNIST/raw holds its four published .gz files.
"""
from __future__ import annotations

import socket
from pathlib import Path


from utils.datasets import idx
from utils.datasets.base import DEFAULT_DATA_DIR, Dataset

NAME = "mnist"
CLASS_NAMES = tuple(str(d) for d in range(10))
TRAIN_SIZE = 60_000
FAMILY = idx.IdxFamily(
    title="MNIST",
    sha256={  # of the unpacked published files
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    fix="restore it with `git checkout -- data/MNIST/raw` or copy the original file there")


def torchvision_download(dataset_class: str, root: Path) -> None:
    """torchvision's download of torchvision.datasets.<dataset_class> into
    root/<Class>/raw; any failure is left to the caller's check of the files (no network, a
    mirror down and a proxy all end in the same advice). torchvision is imported only
    here: it takes seconds, and every script would pay them at start."""
    import torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        getattr(torchvision.datasets, dataset_class)(root=str(root), train=True, download=True)
    except Exception:
        pass
    finally:
        socket.setdefaulttimeout(previous)


def locate(data_dir, subfolder: str, family: idx.IdxFamily, download: bool, download_class: str,
           extra: tuple = (), hint: str = "") -> Path:
    """The first folder holding all four files: DIR/<subfolder>/raw (torchvision's layout),
    DIR itself, then `extra` places; else download into DIR/<subfolder>/raw."""
    base = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    candidates = [base / subfolder / "raw", base, *(Path(p) for p in extra)]
    for folder in candidates:
        if not idx.missing_files(folder):
            return folder
    target = candidates[0]
    if download:
        torchvision_download(download_class, base)
        if not idx.missing_files(target):
            return target
    raise idx.not_found(family, [target], idx.missing_files(target), download, hint)


def open_dataset(data_dir=None, download: bool = True, **_) -> Dataset:
    folder = locate(data_dir, "MNIST", FAMILY, download, "MNIST")
    idx.verify_all(folder, FAMILY)
    return Dataset(NAME, FAMILY.title, CLASS_NAMES, 1, 28, folder,
                   idx.content_fingerprint(FAMILY),
                   lambda split: idx.load_split(folder, split, FAMILY),
                   split="60,000 training and 10,000 test images (the published split)")
