"""Checkpoints: atomic writes, safe loads, and clear errors for bad files and failed writes.

A checkpoint is a dict of tensors and plain values only, so it loads with
`torch.load(path, weights_only=True)`, which refuses pickled code. It carries the
run's full Config as plain values, so the model can be rebuilt from it alone.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

FORMAT = "mnist-diffusion-checkpoint"
VERSION = 1
LATEST = "latest.pt"
PERIODIC = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong kind."""


class SaveError(OSError):
    """A file could not be written (disk full, I/O error); the target is untouched and
    no temporary file is left. The message is one line: what, where and why."""


def write_failure(error: BaseException, folder) -> str:
    """Why a write failed, in a few words: 'no space left on device' and the like.

    torch.save reports a failed write as a RuntimeError without the errno; a nearly
    full file system is then named from its free space."""
    if isinstance(error, OSError) and error.errno is not None:
        return (os.strerror(error.errno) if error.errno != errno.ENOSPC
                else "no space left on device").lower()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return f"no space left on device ({free >> 20} MB free)"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first[:160]


def save_checkpoint(state: dict, path) -> Path:
    """Write a training checkpoint (marked with this project's format) atomically."""
    return atomic_save({"format": FORMAT, "version": VERSION, **state}, path)


def atomic_save(obj, path) -> Path:
    """torch.save `obj` to `path` so that a crash at any moment leaves either the old file
    or the new one: temporary file in the same folder, flush, fsync, rename, fsync folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        raise SaveError(f"could not save {path}: {write_failure(error, path.parent)}") from error
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
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
