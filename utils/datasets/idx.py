"""The IDX format of MNIST and Fashion-MNIST: four files, read straight from their .gz.

Each file is read from `NAME.gz` (or, where only that exists, the unpacked `NAME`),
decompressed in memory and checked against the SHA-256 of the published file's content
before use: a corrupt, truncated, zeroed or foreign file is one line naming it and the
fix, whatever compressed it (Debian recompresses Fashion-MNIST, so its .gz bytes differ
from upstream while the content does not). Nothing is unpacked to disk, so a read-only
data folder works and an interrupted first run leaves nothing behind.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.datasets.base import DataDamagedError, DataNotFoundError

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
ALL_FILES = tuple(name for pair in FILES.values() for name in pair)


@dataclass(frozen=True)
class IdxFamily:
    title: str  # "MNIST"
    sha256: dict  # file name -> SHA-256 of its unpacked content
    fix: str  # what to do about a damaged file


def find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def missing_files(folder: Path) -> list[str]:
    return [name for name in ALL_FILES if find_file(folder, name) is None]


def content_fingerprint(family: IdxFamily) -> str:
    return hashlib.sha256("".join(family.sha256[n] for n in ALL_FILES).encode()).hexdigest()


_verified: dict[tuple, bytes] = {}  # (path, size, mtime) -> checked content, per process


def read_verified(folder: Path, name: str, family: IdxFamily) -> bytes:
    """The content of file `name` in `folder` (its .gz or the plain file), checked
    against its published SHA-256; DataDamagedError (one line) otherwise. A file read
    once is not read again in this process unless it changed on disk."""
    path = find_file(folder, name)
    if path is None:
        raise DataNotFoundError(f"{family.title} file {folder / name}.gz is missing")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        _verified[key] = _read_and_check(path, name, family)
    return _verified[key]


def _read_and_check(path: Path, name: str, family: IdxFamily) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        if isinstance(error, OSError) and not isinstance(error, gzip.BadGzipFile) \
                and error.errno is not None:
            raise DataDamagedError(f"could not read {family.title} file {path} "
                                   f"({error.strerror})") from None
        raise DataDamagedError(f"{family.title} file {path} does not match its published "
                               f"SHA-256 (it is not a readable gzip: corrupt or truncated); "
                               f"{family.fix}") from None
    if hashlib.sha256(data).hexdigest() != family.sha256[name]:
        raise DataDamagedError(f"{family.title} file {path} does not match its published "
                               f"SHA-256 (corrupt, truncated or a different file); "
                               f"{family.fix}")
    return data


def verify_all(folder: Path, family: IdxFamily) -> None:
    """Check all four files now (before any training), not when a split is first used."""
    for name in ALL_FILES:
        read_verified(folder, name, family)


def parse(data: bytes) -> np.ndarray:
    """An IDX byte string -> uint8 array of its shape (images (N, H, W), labels (N,))."""
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(folder: Path, split: str, family: IdxFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 1, 28, 28), int64 (N,)) of a split, from verified files."""
    image_name, label_name = FILES[split]
    images = parse(read_verified(folder, image_name, family))
    labels = parse(read_verified(folder, label_name, family))
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def not_found(family: IdxFamily, searched: list[Path], missing: list[str], tried_download: bool,
              hint: str = "") -> DataNotFoundError:
    where = " or ".join(str(p.resolve()) for p in searched)
    return DataNotFoundError(
        f"{family.title} not found: put the four files {', '.join(ALL_FILES)} (or their .gz) "
        f"in {where} (missing: {', '.join(missing)}); "
        + ("this machine could not download them" if tried_download
           else "--no-download: no download was tried") + (f"; {hint}" if hint else ""))
