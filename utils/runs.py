"""Run folders and their locks: a new run never overwrites another.

Each training run gets its own folder, `runs/<date>-<time>-<preset>[-<name>]/`, holding
its checkpoints and everything it writes (sample grids, loss history, config.json).
The newest run is the one whose latest.pt was written last; `--resume auto` and
`generate.py` without `--checkpoint` take it. A folder given explicitly
(`--checkpoint-dir`, `--output-dir`) is honoured, but one that holds another run is
refused unless the run is resumed (`--resume`) or `--overwrite` is given.

While a run trains it holds a lock on its checkpoint folder (`.lock`, an advisory
`flock` that the kernel releases when the process dies, so a SIGKILL or power loss
leaves nothing that blocks the next start); a second run on the same folder stops at
once with one line naming the process that holds it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from config import Config, ConfigError
from utils import checkpoint as ckpt

RUNS_DIR = Path("runs")
LOCK = ".lock"
# What a run writes into its output folder (removed by --overwrite, with the checkpoints).
RUN_OUTPUTS = ("config.json", "loss_history.csv", "loss.png", "evaluations.json",
               "training_curves.png", "samples_final.png", "samples_epoch_*.png")

try:  # POSIX
    import fcntl
except ImportError:  # Windows: a lock file whose owner is checked by pid
    fcntl = None


class RunLockedError(RuntimeError):
    """Another live process is training in this folder."""


def new_run_name(config: Config, name: str = "", now: float | None = None) -> str:
    """'20261126-145012-cpu' or, with a name, '20261126-145012-cpu-mytest'."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    parts = [stamp, config.PRESET if config.PRESET != "none" else "default"]
    if name:
        parts.append("".join(c if c.isalnum() or c in "-_." else "-" for c in name))
    return "-".join(parts)


def claim_new_folder(config: Config, name: str = "", root=RUNS_DIR) -> Path:
    """Create (atomically) a fresh run folder under `root`; never one that exists."""
    base = Path(root) / new_run_name(config, name)
    Path(root).mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        folder = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {root}")


def with_run_folders(config: Config, name: str = "", root=RUNS_DIR) -> Config:
    """Fill in empty CHECKPOINT_DIR / OUTPUT_DIR: a new folder under `root` for the
    checkpoints, and the same folder for the outputs."""
    if config.CHECKPOINT_DIR and config.OUTPUT_DIR:
        return config
    checkpoint_dir = config.CHECKPOINT_DIR or str(claim_new_folder(config, name, root))
    return config.replace(CHECKPOINT_DIR=checkpoint_dir,
                          OUTPUT_DIR=config.OUTPUT_DIR or checkpoint_dir)


def remove_if_empty(folder) -> bool:
    """Remove a run folder that holds nothing but its lock (a run that failed at once)."""
    folder = Path(folder)
    try:
        if folder.is_dir() and all(p.name == LOCK for p in folder.iterdir()):
            (folder / LOCK).unlink(missing_ok=True)
            folder.rmdir()
            return True
    except OSError:
        pass
    return False


def holds_a_run(folder) -> str | None:
    """A description of the run whose files are in `folder`, or None if there is none."""
    folder = Path(folder)
    latest = ckpt.find_latest(folder) if folder.is_dir() else None
    if latest is not None:
        return f"checkpoint {latest}"
    for name in RUN_OUTPUTS:
        found = sorted(folder.glob(name)) if folder.is_dir() else []
        if found:
            return f"the outputs of a run ({found[0]})"
    return None


def refuse_if_taken(config: Config) -> None:
    """ConfigError (one line) when an explicitly given folder holds another run."""
    for folder, flag in ((config.CHECKPOINT_DIR, "--checkpoint-dir"),
                         (config.OUTPUT_DIR, "--output-dir")):
        found = holds_a_run(folder) if folder else None
        if found:
            latest = ckpt.find_latest(folder) if flag == "--checkpoint-dir" else None
            resume = f"--resume {latest}" if latest else "--resume"
            raise ConfigError(f"{flag} {folder} holds another run ({found}); continue it with "
                              f"{resume}, start over there with --overwrite, or leave out "
                              f"{flag} for a new folder under {RUNS_DIR}/")


def clear_run(config: Config) -> list[Path]:
    """--overwrite: delete the previous run's checkpoints and outputs in the run's folders."""
    doomed = []
    for folder in {Path(f) for f in (config.CHECKPOINT_DIR, config.OUTPUT_DIR) if f}:
        if not folder.is_dir():
            continue
        doomed += [folder / ckpt.LATEST] if (folder / ckpt.LATEST).exists() else []
        doomed += [p for p in folder.glob("epoch_*.pt") if ckpt.PERIODIC.match(p.name)]
        for pattern in RUN_OUTPUTS:
            doomed += list(folder.glob(pattern))
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def newest_checkpoint(root=RUNS_DIR, also=("checkpoints",)) -> Path | None:
    """latest.pt of the run written most recently, under `root` (or, for runs made by
    earlier versions, in the folders `also`); None if there is none."""
    candidates = list(Path(root).glob(f"*/{ckpt.LATEST}"))
    candidates += [Path(folder) / ckpt.LATEST for folder in also
                   if (Path(folder) / ckpt.LATEST).is_file()]
    if not candidates:
        periodic = [ckpt.find_latest(folder) for folder in Path(root).glob("*") if folder.is_dir()]
        candidates = [p for p in periodic if p is not None]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


class RunLock:
    """Exclusive lock on a run folder for as long as the run trains (a context manager).

    Raises RunLockedError naming the holder's pid when another live process holds it.
    A lock left by a dead process is taken over: with flock the kernel has already
    released it; without flock (Windows) the recorded pid is checked.
    """

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self._fd = None

    def _holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process"

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}"
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise RunLockedError(f"{self.path.parent} is in use by another training run "
                                     f"({self._holder()}); wait for it to finish or stop it, "
                                     f"or train in another folder") from None
            os.ftruncate(fd, 0)
            os.write(fd, me.encode())
            self._fd = fd
            return self
        while True:  # no flock: O_EXCL pid file, stale if its pid is gone
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, me.encode())
                self._fd = fd
                return self
            except FileExistsError:
                holder = self._holder()
                try:
                    pid = int(holder.split()[1])
                    os.kill(pid, 0)
                except (IndexError, ValueError, OSError):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunLockedError(f"{self.path.parent} is in use by another training run "
                                     f"({holder}); wait for it to finish or stop it") from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if fcntl is None:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
