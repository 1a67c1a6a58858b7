"""What every dataset provides, and the errors of data that cannot be read.

A dataset module builds a `Dataset`: its name, its class names (empty when unlabelled),
the channels and side of its square images, a fingerprint of its content (which keys
the caches built from it, such as a folder's evaluation classifier), and `load(split)`
for the 'train' and 'test' splits as (uint8 images (N, C, H, W), int64 labels (N,)).
Loading is checked (damaged data is one line naming the file and the fix) and cached
per process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from utils.errors import DataError

ROOT = Path(__file__).resolve().parents[2]  # the repository
DEFAULT_DATA_DIR = ROOT / "data"  # where the shipped MNIST lives, wherever the scripts run from
SPLITS = ("train", "test")


class DataNotFoundError(DataError):
    """The dataset's files are not on disk and could not be downloaded."""


class DataDamagedError(DataError):
    """A dataset file is there but corrupt, truncated or not the published file."""


class DataMismatchError(DataError):
    """The data found is not the data a checkpoint was trained on (other classes)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str  # the registry's key, as --dataset spells it
    title: str  # as people write it: "Fashion-MNIST"
    class_names: tuple[str, ...]  # () for unlabelled data
    channels: int
    image_size: int
    root: Path  # where its files were found
    fingerprint: str  # identifies the content: equal fingerprints, equal data
    loader: Callable[[str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    split: str = ""  # the splits' sizes and where the test split comes from, for the plan line
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def load(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (N, C, H, W), int64 labels (N,)) of 'train' or 'test', checked."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if split not in self._cache:
            images, labels = self.loader(split)
            assert images.dtype == torch.uint8 and images.shape[1:] == self.image_shape, \
                (images.dtype, tuple(images.shape), self.image_shape)
            if len(labels) and self.class_names and not (
                    0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
                raise DataDamagedError(
                    f"{self.title} ({self.root}): labels must lie in 0-{self.num_classes - 1}, "
                    f"found {int(labels.min())}..{int(labels.max())}")
            self._cache[split] = (images, labels.long())
        return self._cache[split]

    def check_recorded(self, class_names: tuple, fingerprint: str, what: str) -> str | None:
        """Compare with what a checkpoint recorded of its data: other classes (names or
        order) raise DataMismatchError naming both lists, since every label would mean
        another class; the same classes with other content (images added or changed)
        return a warning line; None when they match (or nothing was recorded)."""
        if class_names and tuple(class_names) != self.class_names:
            raise DataMismatchError(
                f"{self.title} has the classes ({', '.join(self.class_names) or 'none'}), but "
                f"{what} was trained on ({', '.join(class_names)}): its labels would name other "
                f"classes; point --data-dir at the data it was trained on")
        if fingerprint and fingerprint != self.fingerprint:
            return (f"note: {self.title} has changed since {what} was trained on it (images "
                    f"added, removed or edited); its classes are the same")
        return None

    def class_index(self, name_or_index: str) -> int:
        """A class by name (case-insensitive) or index; ValueError names the valid ones."""
        text = str(name_or_index).strip()
        if text.isdigit() and int(text) < self.num_classes:
            return int(text)
        lowered = [c.lower() for c in self.class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        raise ValueError(f"{text!r} is not a class of {self.title}: expected 0-"
                         f"{self.num_classes - 1} or one of {', '.join(self.class_names)}")
