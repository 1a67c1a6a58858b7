"""The datasets a run can train on, registered in this one place.

    mnist          the default; ships with the repo (data/MNIST/raw)
    fashion-mnist  the same layout, clothing instead of digits (not shipped: 30 MB)
    folder         your own labelled images: --data-dir DIR/<class>/*.png

Each is a module with `open_dataset(data_dir, download, channels, image_size) -> Dataset`
(see base.py: name, class names, image shape, content fingerprint, checked loading).
Adding a dataset is a module and a line in REGISTRY (and a test).
"""
from __future__ import annotations

from utils.datasets import fashion_mnist, folder, mnist
from utils.datasets.base import (DEFAULT_DATA_DIR, DataDamagedError, DataNotFoundError,  # noqa: F401
                                 Dataset)

REGISTRY = {mnist.NAME: mnist, fashion_mnist.NAME: fashion_mnist, folder.NAME: folder}
NAMES = tuple(REGISTRY)


def open_dataset(name: str = "mnist", data_dir=None, download: bool = True, channels: int = 1,
                 image_size: int = 28) -> Dataset:
    """The dataset `name`, found under data_dir (default: the repo's data/), checked."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    return REGISTRY[name].open_dataset(data_dir=data_dir or None, download=download,
                                       channels=channels, image_size=image_size)


def builtin_classes(name: str) -> tuple[str, ...] | None:
    """The class names of a dataset whose classes are fixed (None for a folder)."""
    return getattr(REGISTRY.get(name), "CLASS_NAMES", None)


def builtin_train_size(name: str) -> int | None:
    return getattr(REGISTRY.get(name), "TRAIN_SIZE", None)
