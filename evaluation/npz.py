"""Samples as .npz files: what `generate.py --save-npz` writes and `--evaluate-npz` reads.

    samples      uint8 (N, H, W) greyscale or (N, H, W, 3) colour, 0 = black
    labels       optional int (N,): the class each sample was drawn for (conditional accuracy)
    dataset      optional str: what the samples are of (mnist, fashion-mnist, folder), so that
    data_dir,    --evaluate-npz scores them against it without a --checkpoint; with the
    class_names  folder's path and the classes, for a folder

Written atomically (utils.files); read with one-line errors (`NpzError`, exit code 2)
for a file that is missing, empty, not an .npz, of the wrong shape or range.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from config import MIN_EVAL_SAMPLES
from utils.errors import UsageError
from utils.files import save_npz


class NpzError(UsageError):
    pass


def to_array(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) -> the file's layout: (N, H, W) or (N, H, W, C)."""
    array = images.cpu().numpy()
    return array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)


def write_samples(path, images: torch.Tensor, labels: torch.Tensor | None = None,
                  dataset: dict | None = None) -> Path:
    """uint8 images (N, C, H, W), their classes and what dataset they are of
    ({"dataset", "data_dir", "class_names"}), atomically."""
    arrays = {"samples": to_array(images)}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
    for key, value in (dataset or {}).items():
        arrays[key] = np.array(value, dtype=str)
    return save_npz(path, **arrays)


def recorded_dataset(path) -> dict | None:
    """{"dataset", "data_dir", "class_names"} as write_samples recorded them, or None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "dataset" not in data.files:
                return None
            return {"dataset": str(data["dataset"]),
                    "data_dir": str(data["data_dir"]) if "data_dir" in data.files else "",
                    "class_names": tuple(map(str, data["class_names"]))
                    if "class_names" in data.files else ()}
    except Exception:  # noqa: BLE001 (any unreadable file: load_samples says what is wrong)
        return None


def load_samples(path, num_classes: int | None = None, flag: str = "--evaluate-npz"
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(uint8 images (N, C, H, W), int64 labels (N,) or None) from an .npz of samples."""
    path = Path(path)
    if not path.is_file():
        raise NpzError(f"{flag} {path} " + ("is a folder" if path.is_dir() else "does not exist"))
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            raise NpzError(f"{flag} {path} is a single .npy array, not an .npz of named "
                           f"arrays (save it with np.savez(path, samples=array))")
        with data:
            if "samples" not in data.files:
                raise NpzError(f"{flag} {path} has no 'samples' array "
                               f"(keys: {', '.join(data.files) or 'none'})")
            samples = data["samples"]
            labels = data["labels"] if "labels" in data.files else None
    except NpzError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise NpzError(f"{flag} {path} is not a readable .npz (a zip of numpy arrays, as "
                       f"--save-npz writes): {type(error).__name__}") from None
    if samples.dtype != np.uint8 or samples.ndim not in (3, 4) or (
            samples.ndim == 4 and samples.shape[3] not in (1, 3)):
        raise NpzError(f"{flag} {path}: 'samples' must be uint8 (N, H, W) or (N, H, W, 3), got "
                       f"{samples.dtype} {samples.shape}")
    if len(samples) < MIN_EVAL_SAMPLES:
        raise NpzError(f"{flag} {path} holds {len(samples)} samples; evaluation needs at least "
                       f"{MIN_EVAL_SAMPLES} (FID depends on the count: 10,000 is the standard)")
    if samples.max() <= 1:
        raise NpzError(f"{flag} {path}: every pixel is 0 or 1, but 'samples' are 0-255 "
                       f"(multiply by 255 before saving)")
    images = torch.from_numpy(samples.copy())
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
    if labels is not None:
        top = (num_classes or 10) - 1
        if (labels.shape != (len(samples),) or not np.issubdtype(labels.dtype, np.integer)
                or labels.min() < 0 or labels.max() > top):
            raise NpzError(f"{flag} {path}: 'labels' must be N = {len(samples)} integers 0-{top} "
                           f"(the class each sample was drawn for), got {labels.dtype} "
                           f"{labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return images, labels
