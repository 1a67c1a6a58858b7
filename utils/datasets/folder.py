"""Your own images: a folder laid out as torchvision's ImageFolder expects,

    DIR/<class name>/*.png|jpg|jpeg|bmp|webp     (classes: the subfolders, sorted)
    DIR/*.png ...                                 (no subfolders: one class, unconditional)

greyscale or colour (--channels 1 or 3), centre-cropped to a square and resized to
--image-size. The test split is DIR/test/ (laid out the same way) when it exists, else
a reproducible tenth of each class (every image's place decided by a fixed seed), never
trained on. The fingerprint hashes every file's bytes with the size and channels, so
caches built from the data (its evaluation classifier) follow its content.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from utils.datasets.base import DataDamagedError, DataNotFoundError, Dataset
from utils.errors import UsageError

NAME = "folder"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
HELD_OUT = 0.1  # share of each class kept for the test split when there is no DIR/test/
SPLIT_SEED = 1234


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in ("test", "train"))


def scan(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """(class names, {'train': [(file, class)], 'test': [...]}) of a folder dataset."""
    train_root = root / "train" if (root / "train").is_dir() else root
    classes = _class_folders(train_root)
    if classes:
        names = tuple(c.name for c in classes)
        files = [(f, k) for k, c in enumerate(classes) for f in _images_in(c)]
        empty = [c.name for c in classes if not _images_in(c)]
        if empty:
            raise DataNotFoundError(f"--data-dir {root}: class folder(s) {', '.join(empty)} "
                                    f"hold no images ({', '.join(EXTENSIONS)})")
    else:
        names = ()
        files = [(f, 0) for f in _images_in(train_root)]
    if not files:
        raise DataNotFoundError(f"--data-dir {root} holds no images: expected DIR/<class>/*.png "
                                f"(one subfolder per class) or DIR/*.png (one class)")
    test_root = root / "test"
    if test_root.is_dir():
        if names:
            test = [(f, names.index(c.name)) for c in _class_folders(test_root)
                    if c.name in names for f in _images_in(c)]
        else:
            test = [(f, 0) for f in _images_in(test_root)]
        if not test:
            raise DataNotFoundError(f"{test_root} holds no images of the classes "
                                    f"{', '.join(names) or '(one class)'}")
        return names, {"train": files, "test": test}
    order = np.random.default_rng(SPLIT_SEED).permutation(len(files))
    held = np.zeros(len(files), dtype=bool)
    for k in range(max(1, len(names))):
        members = [i for i in order if files[i][1] == k]
        held[members[:max(1, round(HELD_OUT * len(members)))]] = True
    if held.all():
        raise DataNotFoundError(f"--data-dir {root}: too few images to hold out a test split "
                                f"(each class needs at least 2)")
    return names, {"train": [f for f, h in zip(files, held) if not h],
                   "test": [f for f, h in zip(files, held) if h]}


def read_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One image file -> uint8 (C, size, size): centre-cropped square, resized."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            if side != size:
                image = image.resize((size, size), Image.BICUBIC)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataDamagedError(f"image {path} cannot be read "
                               f"({type(error).__name__}: {str(error)[:80]}); delete or replace "
                               f"it") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def check_readable(files: dict) -> None:
    """Open every image's header now (cheap), so that a file that is not a picture stops
    the run before training, whichever split it falls in."""
    for entries in files.values():
        for path, _ in entries:
            try:
                with Image.open(path):
                    pass
            except (UnidentifiedImageError, OSError) as error:
                raise DataDamagedError(f"image {path} cannot be read ({type(error).__name__}); "
                                       f"delete or replace it") from None


def fingerprint(files: dict, channels: int, size: int) -> str:
    digest = hashlib.sha256(f"folder:{channels}:{size}".encode())
    for split in ("train", "test"):
        for path, label in files[split]:
            digest.update(f"{split}:{path.name}:{label}:".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def open_dataset(data_dir=None, download: bool = True, channels: int = 1, image_size: int = 28,
                 **_) -> Dataset:
    if not data_dir:
        raise UsageError("--dataset folder needs --data-dir DIR (DIR/<class>/*.png)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataNotFoundError(f"--data-dir {root} is not a folder")
    if channels not in (1, 3):
        raise UsageError(f"--channels must be 1 (greyscale) or 3 (colour), got {channels}")
    names, files = scan(root)
    check_readable(files)

    def load(split: str):
        entries = files[split]
        images = np.stack([read_image(f, channels, image_size) for f, _ in entries])
        labels = np.array([k for _, k in entries], dtype=np.int64)
        return torch.from_numpy(images), torch.from_numpy(labels)

    return Dataset(NAME, f"folder {root}", names, channels, image_size, root,
                   fingerprint(files, channels, image_size), load)


def count_train_images(data_dir) -> int:
    """How many training images a folder dataset has (for the batch-size check)."""
    return len(scan(Path(data_dir))[1]["train"])
