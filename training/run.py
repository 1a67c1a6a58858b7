"""A training run from start to end: its config (new, or resumed from a checkpoint), its
folders and locks, the plan, and the loop; `train_model` is what `python main.py` does.

    from training.run import train_model
    model, losses = train_model(Config.from_preset("cpu", MAX_MINUTES=5))
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

from config import Config, ConfigError, check_device, config_for_resume, default_device
from training.distill import Distiller
from training.trainer import Trainer
from utils import checkpoint as ckpt
from utils import distributed as dist
from utils.errors import ResourceError, UserError, first_line, is_out_of_memory
from utils.runs import (RUNS_DIR, clear_run, foreign_files, locked, newest_checkpoint,
                        refuse_if_taken, remove_if_empty, with_run_folders)


def find_resume_checkpoint(resume: str, checkpoint_dir: str | None, log=print) -> Path | None:
    """The checkpoint that --resume names: a path, or for 'auto' the newest run's (None,
    said in one line, when there is none)."""
    if resume != "auto":
        return Path(resume)
    path = ckpt.find_latest(checkpoint_dir) if checkpoint_dir else newest_checkpoint()
    if path is None:
        log(f"--resume auto: no checkpoint in {checkpoint_dir or 'runs/'}; starting a new run")
    return path


def resumed_config(path: Path, state: dict, requested: dict, log=print) -> Config:
    """The config that continues the run of checkpoint `path`: its own, with the requested
    run-control settings. The run continues in its own folder when that folder is its own
    and the checkpoint the newest there; otherwise in a new run folder (said in one line).
    A folder given explicitly that holds anything else is refused, and so is a checkpoint
    of weights alone (a distillation round's student, an exported model)."""
    saved = Config.from_dict(state["config"])
    if "optimizer" not in state:
        sample = f"or sample it: python generate.py --checkpoint {path}"
        raise ConfigError(
            f"--resume {path} is the student of one round of a distillation, not a run's "
            f"state: resume its run with --resume {path.parent / ckpt.LATEST}, {sample}"
            if saved.DISTILL else
            f"--resume {path} holds a model's weights only, not a run's state (no optimizer): "
            f"resume a run's {ckpt.LATEST}, {sample}")
    requested = dict(requested)
    if "DEVICE" not in requested:  # the run's own device, if this machine has it
        try:
            requested["DEVICE"] = check_device(saved.DEVICE)
        except ConfigError:
            requested["DEVICE"] = default_device()
            log(f"the run trained on {saved.DEVICE}, which this machine lacks; continuing on "
                f"{requested['DEVICE']} (not bit-for-bit as one run)")
    for name, flag in (("CHECKPOINT_DIR", "--checkpoint-dir"), ("OUTPUT_DIR", "--output-dir")):
        if name in requested:
            problems = foreign_files(requested[name], state, path)
            if problems:
                raise ConfigError(f"{flag} {requested[name]}: {problems[0]}; resuming writes only "
                                  f"into the run's own folder: leave out {flag}, or name an "
                                  f"empty folder")
    if "CHECKPOINT_DIR" not in requested:
        own = path.parent  # the run's folder is where its checkpoint is now
        outputs = (requested.get("OUTPUT_DIR") or
                   (str(own) if saved.OUTPUT_DIR in ("", saved.CHECKPOINT_DIR) else saved.OUTPUT_DIR))
        problems = foreign_files(own, state, path) + (
            foreign_files(outputs, state, path) if Path(outputs) != own else [])
        if problems:
            log(f"continuing {path} in a new run folder: {problems[0]}")
            requested["CHECKPOINT_DIR"] = ""
            requested.setdefault("OUTPUT_DIR", "")
        else:
            requested["CHECKPOINT_DIR"] = str(own)
            requested.setdefault("OUTPUT_DIR", outputs)
    return config_for_resume(saved, requested).validate()


def prepare_folders(config: Config, overwrite: bool = False) -> tuple[Config, list[Path]]:
    """A new run's folders: given folders that hold another run are refused, unless
    --overwrite, which deletes that run's files under the locks of both folders (never
    under a run that is training there). Empty folders mean a new one under runs/.
    Returns (config, the files --overwrite removed)."""
    if overwrite:
        with locked(config.CHECKPOINT_DIR, config.OUTPUT_DIR):
            return config, clear_run(config)
    refuse_if_taken(config)
    return config, []


def train_model(config: Config | None = None, resume: dict | str | None = None,
                progress: bool = True, log=print, plan: bool = False, name: str = ""):
    """Train with `config` (default: `Config.from_preset("auto")`, what `python main.py`
    does) and return (the model with its EMA weights, in eval mode; the loss of every step).

    resume: a checkpoint state or path to continue from. Empty CHECKPOINT_DIR/OUTPUT_DIR
    mean a new folder under runs/ (named with `name`; removed again if the run fails
    before writing anything). Holds the locks of the run's folders while training.
    Raises the trainer's exceptions (TrainingInterrupted on Ctrl-C after saving,
    SaveError when a checkpoint cannot be written, ...)."""
    if isinstance(resume, (str, Path)):
        resume = ckpt.load_checkpoint(resume)
    config = config or Config.from_preset("auto")
    new_folder = not config.CHECKPOINT_DIR
    # under torchrun, rank 0 names (and creates) the run folder for all
    config = dist.broadcast_object(with_run_folders(config, name) if dist.is_main() else None)
    lock = locked(config.CHECKPOINT_DIR, config.OUTPUT_DIR) if dist.is_main() else contextlib.nullcontext()
    try:
        with lock:
            kind = Distiller if config.DISTILL else Trainer
            trainer = kind(config, resume=resume, progress=progress, log=log)
            finished = trainer.finished()
            if finished:
                log(f"nothing to do: this run is finished ({finished})")
                trainer.close()
            else:
                if plan and dist.is_main():
                    log(trainer.plan())
                trainer.fit()
    except RuntimeError as error:
        if new_folder and dist.is_main():
            remove_if_empty(config.CHECKPOINT_DIR)
        if not dist.is_initialized() or isinstance(error, UserError) or is_out_of_memory(error):
            raise
        reason = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first_line(error, 160))
        raise ResourceError(f"(rank {dist.rank()}) lost contact with the other processes (one "
                            f"died or stopped answering: {reason}); the last good checkpoint "
                            f"is in {config.CHECKPOINT_DIR}") from None
    except BaseException:
        if new_folder and dist.is_main():
            remove_if_empty(config.CHECKPOINT_DIR)
        raise
    return trainer.ema, list(trainer.losses)


def next_step(latest: Path) -> str:
    """The command that draws from the run just trained ("" if it wrote no checkpoint)."""
    if not latest.is_file():
        return ""
    newest = newest_checkpoint() if Path(RUNS_DIR).is_dir() else None
    if newest is not None and newest.resolve() == latest.resolve():
        return f"next: python generate.py   (draws from the newest run; or --checkpoint {latest})"
    return f"next: python generate.py --checkpoint {latest}"
