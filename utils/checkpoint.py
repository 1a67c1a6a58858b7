"""Checkpoints: atomic writes, safe loads, and clear errors for bad files.

A checkpoint is a dict of tensors and plain values only, so it loads with
`torch.load(path, weights_only=True)`, which refuses pickled code. It carries the
run's full Config as plain values, so the model can be rebuilt from it alone.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

FORMAT = "mnist-diffusion-checkpoint"
VERSION = 1
LATEST = "latest.pt"
PERIODIC = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong kind."""


def save_checkpoint(state: dict, path) -> Path:
    """Write a training checkpoint (marked with this project's format) atomically."""
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def atomic_save(obj, path) -> Path:
    """torch.save `obj` to `path` so that a crash at any moment leaves either the old file
    or the new one: temporary file in the same folder, flush, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
        pass
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; CheckpointError in one line otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
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
    return state


def remove_stale_temporaries(checkpoint_dir) -> list[Path]:
    """Delete half-written files that a killed process left behind (.NAME.tmp-PID)."""
    stale = list(Path(checkpoint_dir).glob(".*.tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def periodic_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def find_latest(checkpoint_dir) -> Path | None:
    """latest.pt if present, else the newest periodic checkpoint, else None."""
    folder = Path(checkpoint_dir)
    if (folder / LATEST).is_file():
        return folder / LATEST
    periodic = sorted(p for p in folder.glob("epoch_*.pt") if PERIODIC.match(p.name))
    return periodic[-1] if periodic else None


def prune_periodic(checkpoint_dir, keep: int) -> list[Path]:
    """Delete all but the `keep` newest epoch_*.pt files; returns the deleted paths."""
    periodic = sorted(p for p in Path(checkpoint_dir).glob("epoch_*.pt") if PERIODIC.match(p.name))
    doomed = periodic[:-keep] if keep > 0 else periodic
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
