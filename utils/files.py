"""Writing files so that nothing is ever half-written, and naming them so that nothing is
overwritten by surprise.

Every file the project writes (checkpoints, .npz, PNG, GIF, JSON, CSV) goes through
`atomic_write`: into a temporary file in the same folder (`.NAME.tmp-PID`), flushed,
fsynced, then renamed over the target, so a crash, a kill or a full disk at any moment
leaves either the old file or the new one, never a partial one, and no temporary file.
A failed write is `SaveError`, one line: what, where and why.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from utils.errors import ResourceError, UsageError


class SaveError(ResourceError, OSError):
    """A file could not be written (disk full, I/O error); the target is untouched and no
    temporary file is left. The message is one line: what, where and why."""


def write_failure(error: BaseException, folder) -> str:
    """Why a write failed, in a few words: 'no space left on device' and the like.

    torch.save reports a failed write as a RuntimeError without the errno; a nearly
    full file system is then named from its free space."""
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno == errno.ENOSPC:
            return "no space left on device"
        return os.strerror(error.errno).lower()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 << 20:
        return f"no space left on device ({free >> 20} MB free)"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first[:160]


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then move it into place
    atomically (fsync, rename, fsync the folder). Raises SaveError, leaving `path` as it
    was and no temporary file behind."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; name a file")
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError, ValueError) as error:
        raise SaveError(f"could not save {path}: {write_failure(error, path.parent)}") from error
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete half-written files that a killed process left behind (.NAME.tmp-PID)."""
    stale = [p for p in Path(folder).glob(".*.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_recorded(path, sha256: str, what: str, fix: str, error=RuntimeError) -> str:
    """Shipped weights: `error` (one line, with `fix`) if the file at `path` is missing or
    is not the one whose SHA-256 was recorded; its SHA-256 otherwise."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} is missing; {fix}")
    found = sha256_of(path)
    if found != sha256:
        raise error(f"{what} {path} has SHA-256 {found[:16]}..., not the recorded "
                    f"{sha256[:16]}...; {fix}")
    return found


_CLAIMED: set[Path] = set()  # names this process claimed and has not written yet


def claim(*paths) -> bool:
    """Claim names atomically, all or none: each is created empty with O_EXCL, so of two
    processes that want one name only one gets it (checking that a file exists, then
    writing it later, lets both write and one picture be lost). The claimed files are
    filled by later writes (atomic_write replaces them); `release_unwritten` removes the
    ones still empty. Returns False, claiming nothing, if any name is taken."""
    made = []
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            for p in made:
                p.unlink(missing_ok=True)
                _CLAIMED.discard(p)
            return False
        made.append(path)
        _CLAIMED.add(path)
    return True


def release_unwritten() -> None:
    """Remove the claimed names that were never written (still empty): a job that failed
    or was stopped leaves no empty pictures behind."""
    for path in list(_CLAIMED):
        try:
            if path.stat().st_size == 0:
                path.unlink()
        except OSError:
            pass
        _CLAIMED.discard(path)


def unused(path) -> Path:
    """`path`, or path-2, path-3, ... if it is taken (for files the user did not name),
    claimed for this process (see `claim`)."""
    path = Path(path)
    candidate, k = path, 2
    while not claim(candidate):
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def save_json(data: dict, path) -> Path:
    """`data` as indented JSON (non-finite floats become null), written atomically."""
    text = json.dumps(_plain(data), indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_text(text: str, path) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_npz(path, **arrays) -> Path:
    """numpy's compressed .npz, written atomically (np.savez would add '.npz' to a
    temporary name, so it writes to an open file)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return atomic_write(path, write)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
