"""Run folders and their locks: a run writes only into its own folder.

Each training run gets its own folder, `runs/<date>-<time>-<preset>[-<name>]/`, holding
its checkpoints and everything it writes (sample grids, loss history, config.json).
The newest run is the one whose newest checkpoint was written last; `--resume auto`
and `generate.py` without `--checkpoint` take it. A folder given explicitly
(`--checkpoint-dir`, `--output-dir`) is honoured, but one that holds another run is
refused unless `--overwrite` is given. A resumed run continues in its own folder only
when that folder is its own and the checkpoint is the newest there (so latest.pt never
moves backwards and nobody's files are replaced); otherwise it continues in a new run
folder and says so (`resume_folder`).

While a run trains it holds a lock on its folders (`.lock`, an advisory `flock` that the
kernel releases when the process dies, so a SIGKILL or power loss leaves nothing that
blocks the next start); a second run there stops at once with one line naming the
process that holds it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from utils import checkpoint as ckpt
from utils.errors import ConfigError, UsageError

RUNS_DIR = Path("runs")
LOCK = ".lock"
NAME_LIMIT = 80  # characters of --name kept in a folder name (file systems allow 255 bytes)
# What a run writes into its output folder (removed by --overwrite, with the checkpoints).
RUN_OUTPUTS = ("config.json", "loss_history.csv", "loss.png", "evaluations.json",
               "training_curves.png", "samples_final.png", "samples_epoch_*.png")
# Settings that do not change what a run learns: ignored when telling runs apart.
_NOT_IDENTITY = {"EPOCHS", "MAX_STEPS", "MAX_MINUTES", "DEVICE", "LOADER", "NUM_WORKERS",
                 "THREADS", "CHECKPOINT_DIR", "OUTPUT_DIR", "DATA_DIR", "DOWNLOAD", "SAVE_EVERY",
                 "SAVE_EVERY_STEPS", "KEEP", "NUM_SAMPLES", "PRINT_EVERY", "EVAL_EVERY",
                 "EVAL_SAMPLES", "SAMPLER", "SAMPLING_STEPS", "ETA", "SPACING", "GUIDANCE",
                 "MAX_BAD_STEPS", "COMPILE", "PRESET", "LOG", "CLASS_NAMES", "world_size",
                 "stretches"}

try:  # POSIX
    import fcntl
except ImportError:  # Windows: a lock file whose owner is checked by pid
    fcntl = None


class RunLockedError(UsageError):
    """Another live process is training in this folder."""


def new_run_name(preset: str, name: str = "", now: float | None = None) -> str:
    """'20261126-145012-cpu' or, with a name, '20261126-145012-cpu-mytest' (the default
    model, --preset none: '...-default')."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    parts = [stamp, preset if preset != "none" else "default"]
    if name:
        parts.append("".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:NAME_LIMIT])
    return "-".join(parts)


def check_name(name: str) -> None:
    if len(name) > NAME_LIMIT:
        raise ConfigError(f"--name is {len(name)} characters; at most {NAME_LIMIT} fit in a "
                          f"folder name")


def claim_new_folder(preset: str, name: str = "", root=RUNS_DIR) -> Path:
    """Create (atomically) a fresh run folder under `root`; never one that exists."""
    base = Path(root) / new_run_name(preset, name)
    Path(root).mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        folder = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {root}")


def with_run_folders(config, name: str = "", root=RUNS_DIR):
    """Fill in empty CHECKPOINT_DIR / OUTPUT_DIR: a new folder under `root` for the
    checkpoints, and the same folder for the outputs."""
    if config.CHECKPOINT_DIR and config.OUTPUT_DIR:
        return config
    checkpoint_dir = config.CHECKPOINT_DIR or str(claim_new_folder(config.PRESET, name, root))
    return config.replace(CHECKPOINT_DIR=checkpoint_dir,
                          OUTPUT_DIR=config.OUTPUT_DIR or checkpoint_dir)


def remove_if_empty(folder) -> bool:
    """Remove a run folder that holds nothing but its lock (a run that failed at once), and
    the runs/ folder above it if that is left empty (nothing behind in a new folder)."""
    folder = Path(folder)
    try:
        if folder.is_dir() and all(p.name == LOCK for p in folder.iterdir()):
            (folder / LOCK).unlink(missing_ok=True)
            folder.rmdir()
            parent = folder.parent
            if parent.name == Path(RUNS_DIR).name and not any(parent.iterdir()):
                parent.rmdir()
            return True
    except OSError:
        pass
    return False


def holds_a_run(folder) -> str | None:
    """A description of the run whose files are in `folder`, or None if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    latest = ckpt.find_latest(folder)
    if latest is not None:
        return f"checkpoint {latest}"
    for name in RUN_OUTPUTS:
        found = sorted(folder.glob(name))
        if found:
            return f"the outputs of a run ({found[0]})"
    return None


def refuse_if_taken(config) -> None:
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


def run_identity(config: dict) -> str:
    """What tells runs apart: their settings other than run control (a hash)."""
    kept = {k: v for k, v in sorted(config.items()) if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def _identity_of_file(path: Path) -> str | None:
    """The run identity recorded in a config.json or a checkpoint; None if unreadable."""
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            values = ckpt.load_checkpoint(path)["config"]
        return run_identity({k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in values.items()})
    except (OSError, ValueError, ckpt.CheckpointError, AttributeError, KeyError, TypeError):
        return None


def foreign_files(folder, state: dict, source: Path) -> list[str]:
    """Why `folder` is not the place to continue the run of checkpoint `state` (read from
    `source`): files of another run or of somebody else, or a newer checkpoint of the
    same run (continuing would move it backwards). Empty when it is the run's own."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = run_identity({k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in state["config"].items()})
    problems = []
    config_json = folder / "config.json"
    if config_json.is_file() and _identity_of_file(config_json) != mine:
        problems.append(f"{config_json} is not this run's")
    latest = folder / ckpt.LATEST
    if latest.is_file() and latest.resolve() != Path(source).resolve():
        try:
            other = ckpt.load_checkpoint(latest)
        except ckpt.CheckpointError:
            other = None
        if other is None or _identity_of_file(latest) != mine:
            problems.append(f"{latest} is another run's")
        elif int(other["step"]) > int(state["step"]):
            problems.append(f"{latest} is newer (step {int(other['step'])} against "
                            f"{int(state['step'])}): continuing here would move it backwards")
    if not config_json.is_file() and not latest.is_file():
        others = [name for name in RUN_OUTPUTS[1:] if any(folder.glob(name))]
        if others:
            problems.append(f"{folder} holds files of another run ({others[0]})")
    return problems


def clear_run(config) -> list[Path]:
    """--overwrite: delete the previous run's checkpoints and outputs in the run's folders."""
    doomed = []
    for folder in {Path(f) for f in (config.CHECKPOINT_DIR, config.OUTPUT_DIR) if f}:
        if not folder.is_dir():
            continue
        doomed += [folder / ckpt.LATEST] if (folder / ckpt.LATEST).exists() else []
        doomed += ckpt.periodic_checkpoints(folder)
        for pattern in RUN_OUTPUTS:
            doomed += list(folder.glob(pattern))
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def run_folders(root=RUNS_DIR) -> list[Path]:
    root = Path(root)
    return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def newest_checkpoint(root=RUNS_DIR, also=("checkpoints",)) -> Path | None:
    """The newest checkpoint (latest.pt, else the highest epoch_*.pt) of the run written
    most recently, under `root` (or, for runs made by earlier versions, in the folders
    `also`); None if there is none. A run whose latest.pt was deleted still counts."""
    candidates = [ckpt.find_latest(folder) for folder in
                  [*run_folders(root), *(Path(f) for f in also if Path(f).is_dir())]]
    candidates = [p for p in candidates if p is not None]
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


@contextlib.contextmanager
def locked(*folders):
    """Hold the locks of several folders (each once) for as long as the block runs."""
    with contextlib.ExitStack() as stack:
        seen = set()
        for folder in folders:
            if folder and Path(folder).resolve() not in seen:
                seen.add(Path(folder).resolve())
                stack.enter_context(RunLock(folder))
        yield
