"""Checkpoints: atomic writes, safe loads, and clear errors for bad files and failed writes.

A checkpoint is a dict of tensors and plain values only, so it loads with
`torch.load(path, weights_only=True)`, which refuses pickled code. It carries the
run's full Config as plain values, so the model can be rebuilt from it alone.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from utils.errors import UsageError
from utils.files import SaveError, atomic_write, remove_stale_temporaries, write_failure  # noqa: F401

FORMAT = "mnist-diffusion-checkpoint"
VERSION = 1
LATEST = "latest.pt"
PERIODIC = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong kind."""


def save_checkpoint(state: dict, path) -> Path:
    """Write a training checkpoint (marked with this project's format) atomically."""
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def atomic_save(obj, path) -> Path:
    """torch.save `obj` to `path` atomically (see utils.files.atomic_write): a crash at
    any moment leaves either the old file or the new one. SaveError otherwise."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; CheckpointError in one line otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save: a zip (or an old pickle)
        raise CheckpointError(f"{path} is not a checkpoint: torch.save writes a zip archive, "
                              f"and this file does not start like one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        if "weights_only" in str(error) or "Unsupported" in str(error) or "GLOBAL" in str(error):
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain "
                f"values (possibly code), so it was not unpickled") from None
        raise CheckpointError(f"checkpoint {path} is corrupt ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project "
                              f"(no '{FORMAT}' marker; was it written by main.py?)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer version (format {state['version']}, "
                              f"this code reads {VERSION})")
    for key in ("config", "model", "ema"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks its '{key}' entry")
    for key in ("ema", "model"):
        bad = non_finite(state[key]) if isinstance(state[key], dict) else None
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({key}: "
                                  f"{bad}); it cannot draw anything: use an earlier "
                                  f"checkpoint of the run")
    return state


def non_finite(weights: dict) -> str | None:
    """The name of the first floating-point tensor of a state dict that holds a NaN or an
    infinity, or None."""
    return next((name for name, value in weights.items() if torch.is_tensor(value)
                 and value.is_floating_point() and not torch.isfinite(value).all()), None)


def periodic_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def periodic_checkpoints(checkpoint_dir) -> list[Path]:
    """The epoch_*.pt files of a folder, oldest epoch first (by number: 9999 < 10000)."""
    found = [p for p in Path(checkpoint_dir).glob("epoch_*.pt") if PERIODIC.match(p.name)]
    return sorted(found, key=lambda p: int(PERIODIC.match(p.name).group(1)))


def find_latest(checkpoint_dir) -> Path | None:
    """latest.pt if present, else the periodic checkpoint of the highest epoch, else None."""
    folder = Path(checkpoint_dir)
    if (folder / LATEST).is_file():
        return folder / LATEST
    periodic = periodic_checkpoints(folder)
    return periodic[-1] if periodic else None


def prune_periodic(checkpoint_dir, keep: int) -> list[Path]:
    """Delete all but the `keep` highest-epoch epoch_*.pt files; returns the deleted paths."""
    periodic = periodic_checkpoints(checkpoint_dir)
    doomed = periodic[:-keep] if keep > 0 else periodic
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
