"""Your own images: a folder laid out as torchvision's ImageFolder expects,

    DIR/<class name>/*.png|jpg|jpeg|bmp|webp     (classes: the subfolders, sorted)
    DIR/*.png ...                                 (no subfolders: one class, unconditional)

greyscale or colour (--channels 1 or 3), centre-cropped to a square and resized to
--image-size. Every mode Pillow opens is read for what it shows: 16- and 32-bit greyscale
scaled to 8 bits (not clipped), transparency composited onto white, palettes expanded;
modes that are not pictures of light (LAB, HSV) are refused in one line.

The split, and the rules the plan line states:
- DIR/test/ (laid out as DIR) is the test split when it exists; DIR/train/ holds the
  training images when it exists. A folder named train or test beside other class
  folders is a split folder only if it is laid out as one (class subfolders, or images
  for a one-class set); otherwise it is ambiguous and refused in one line.
- Classes of test/ that training lacks are refused in one line, naming both lists.
- Without test/, each image is held out (HELD_OUT of them) by a hash of its path
  relative to DIR, so adding or removing images never moves another between the
  splits; a class keeps at least one training image (its held-out ones train instead),
  and a set so small that the hash holds out none gives the first image by hash of each
  class of two or more.
The fingerprint hashes every file's bytes with its relative path, class, size and
channels, so caches built from the data (its evaluation classifier) follow its content.
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
HELD_OUT = 0.1  # share of the images kept for the test split when there is no DIR/test/
SPLITS = ("train", "test")
NOT_PICTURES = ("LAB", "HSV")  # colour spaces Pillow opens but cannot turn into RGB


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_split(folder: Path, classes: list[Path]) -> bool:
    """Whether DIR/train or DIR/test is laid out as a split: class subfolders (or, for
    a one-class set, images directly) rather than being a class of its own."""
    inner = _subfolders(folder)
    if inner:
        return True
    return not classes and bool(_images_in(folder))


def _layout(root: Path) -> tuple[Path, Path | None]:
    """(the folder of the training classes, the test split's folder or None)."""
    splits = {name: root / name for name in SPLITS if (root / name).is_dir()}
    others = [p for p in _subfolders(root) if p.name not in SPLITS]
    for name, folder in splits.items():
        if others and not _is_split(folder, others):
            raise DataNotFoundError(
                f"--data-dir {root}: '{name}' could be a class or the {name} split: it holds "
                f"images beside the classes {', '.join(p.name for p in others)}; rename it, or "
                f"lay out a split as {name}/<class>/*.png")
    if "train" in splits and others:
        raise DataNotFoundError(
            f"--data-dir {root} holds both train/ and class folders ({', '.join(p.name for p in others)}); "
            f"put the classes inside train/, or rename train")
    return splits.get("train", root), splits.get("test")


def _labelled(folder: Path, names: tuple[str, ...]) -> list[tuple[Path, int]]:
    if names:
        return [(f, names.index(c.name)) for c in _subfolders(folder) if c.name in names
                for f in _images_in(c)]
    return [(f, 0) for f in _images_in(folder)]


def split_key(path: Path, root: Path) -> float:
    """A number in [0, 1) from a hash of the image's path relative to the dataset's folder:
    below HELD_OUT, the image is held out. It depends on nothing else, so the decision
    never changes when other files come or go (but for sets too small to hold out any:
    see scan)."""
    key = path.relative_to(root).as_posix().encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2 ** 64


def scan(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """(class names, {'train': [(file, class)], 'test': [...]}) of a folder dataset."""
    train_root, test_root = _layout(root)
    classes = [p for p in _subfolders(train_root) if train_root != root or p.name not in SPLITS]
    names = tuple(c.name for c in classes)
    empty = [c.name for c in classes if not _images_in(c)]
    if empty:
        raise DataNotFoundError(f"--data-dir {root}: class folder(s) {', '.join(empty)} "
                                f"hold no images ({', '.join(EXTENSIONS)})")
    files = _labelled(train_root, names)
    if not files:
        raise DataNotFoundError(f"--data-dir {root} holds no images: expected DIR/<class>/*.png "
                                f"(one subfolder per class) or DIR/*.png (one class)")
    if test_root is not None:
        if names:
            extra = [p.name for p in _subfolders(test_root) if p.name not in names]
            if extra:
                raise DataNotFoundError(
                    f"{test_root} has classes that training lacks: {', '.join(extra)} "
                    f"(training: {', '.join(names)}); rename or remove them")
        test = _labelled(test_root, names)
        if not test:
            raise DataNotFoundError(f"{test_root} holds no images of the classes "
                                    f"{', '.join(names) or '(one class)'}")
        return names, {"train": files, "test": test}
    keys = [split_key(f, root) for f, _ in files]
    held = [key < HELD_OUT for key in keys]
    classes = [[i for i, (_, label) in enumerate(files) if label == k]
               for k in range(max(1, len(names)))]
    for members in classes:  # every class keeps a training image
        if all(held[i] for i in members):
            for i in members:
                held[i] = False
    if not any(held):  # a tiny set: each class of two or more gives its first image by hash
        for members in classes:
            if len(members) >= 2:
                held[min(members, key=lambda i: keys[i])] = True
    if not any(held):
        raise DataNotFoundError(f"--data-dir {root}: too few images to hold out a test split "
                                f"(a class needs at least 2; add images or a test/ folder)")
    return names, {"train": [f for f, h in zip(files, held) if not h],
                   "test": [f for f, h in zip(files, held) if h]}


def describe_split(root: Path, files: dict) -> str:
    """How many images each split has and where the test split comes from (the plan line)."""
    train, test = len(files["train"]), len(files["test"])
    source = (f"test split: {_layout(root)[1]}" if _layout(root)[1] is not None
              else f"test split: {test / (train + test):.0%} held out by a hash of each "
                   f"file's path")
    return f"{train:,} training and {test:,} test images ({source})"


def as_picture(image: Image.Image, channels: int, path: Path) -> Image.Image:
    """Any image Pillow opens, as 8-bit greyscale ('L', channels 1) or RGB: 16- and 32-bit
    greyscale scaled to 8 bits (convert() would clip them: mid-grey read as white), floats
    read as [0, 1] (or [0, 255] when larger), transparency composited onto white."""
    mode = image.mode
    if mode in NOT_PICTURES:
        raise DataDamagedError(f"image {path} is in the {mode} colour space, which cannot be "
                               f"read as a picture here; save it as RGB or greyscale")
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image, dtype=np.float64)
        top = {"F": 1.0 if array.max(initial=0) <= 1 else 255.0}.get(
            mode, 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0)
        image = Image.fromarray(np.round(array / top * 255).clip(0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return image.convert("L" if channels == 1 else "RGB")


def read_image(path: Path, channels: int, size: int) -> np.ndarray:
    """One image file -> uint8 (C, size, size): centre-cropped square, resized."""
    try:
        with Image.open(path) as image:
            image = as_picture(image, channels, path)
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


def fingerprint(root: Path, files: dict, channels: int, size: int) -> str:
    digest = hashlib.sha256(f"folder:{channels}:{size}".encode())
    for split in ("train", "test"):
        for path, label in files[split]:
            digest.update(f"{split}:{path.relative_to(root).as_posix()}:{label}:".encode())
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
                   fingerprint(root, files, channels, image_size), load,
                   split=describe_split(root, files))


def count_train_images(data_dir) -> int:
    """How many training images a folder dataset has (for the batch-size check)."""
    return len(scan(Path(data_dir))[1]["train"])
