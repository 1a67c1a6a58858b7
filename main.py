"""Train a DDPM on MNIST.

    python main.py                              # the right model for this machine, new run folder
    python main.py --epochs 50                  # the default model on CUDA (the CPU preset on a CPU)
    python main.py --preset cpu                 # a small model for a laptop CPU: digits in 15 minutes
    python main.py --resume auto                # continue the newest run in ./runs, exactly
    python main.py --benchmark                  # measure speed; writes outputs/benchmark.json
    torchrun --nproc_per_node 4 main.py         # the same run on 4 GPUs (README, "More than one GPU")

Every setting of config.Config is a flag (python main.py --help lists them). From Python:

    from main import train_model
    model, losses = train_model(Config.from_preset("cpu", MAX_MINUTES=5))
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from pathlib import Path

from config import (PRESETS, Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides, default_device,
                    flag_for)


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="main.py", description="Train a DDPM on MNIST (see README.md).",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=36))
    presets = ["auto", *PRESETS]
    parser.add_argument("--preset", choices=presets, default="auto",
                        metavar="{" + ",".join(presets) + "}",
                        help="start from a named group of settings: cpu (a small model, digits "
                             "in 15 minutes on a laptop), none (the defaults below, for a GPU), "
                             "auto (cpu without CUDA, none with it); explicit flags still win "
                             "(default: auto)")
    parser.add_argument("--name", default="",
                        help="a word for the run folder: runs/<date>-<time>-<preset>-<name>")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue a run from a checkpoint; 'auto' takes the newest run in "
                             "runs/ (or in --checkpoint-dir), or starts afresh if there is none")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a --checkpoint-dir / --output-dir that holds "
                             "another run, deleting that run's checkpoints and outputs")
    parser.add_argument("--benchmark", action="store_true",
                        help="measure training and sampling speed instead of training; "
                             "writes benchmark.json to --output-dir (default: outputs/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    fields = {f.name for f in dataclasses.fields(Config)} - {"PRESET"}
    add_config_arguments(parser, names=fields,
                         default_note={"CHECKPOINT_DIR": "a new folder runs/<date>-<time>-<preset>",
                                       "OUTPUT_DIR": "the checkpoint folder"})
    return parser


def build_config(args) -> tuple[Config, dict | None]:
    """The run's Config (preset, then flags; or the checkpoint's when resuming) and the
    checkpoint state to resume from, if any. Folders are resolved later (prepare_folders)."""
    from utils import checkpoint as ckpt
    from utils.runs import newest_checkpoint
    from utils.trainer import config_for_resume

    requested = config_overrides(args)
    if args.resume:
        if args.preset != "auto":
            print(f"--preset {args.preset} ignored: a resumed run keeps its checkpoint's settings")
        if args.resume == "auto":
            folder = requested.get("CHECKPOINT_DIR")
            path = ckpt.find_latest(folder) if folder else newest_checkpoint()
            if path is None:
                print(f"--resume auto: no checkpoint in {folder or 'runs/'}; starting a new run")
        else:
            path = Path(args.resume)
        if path is not None:
            state = ckpt.load_checkpoint(path)
            saved = Config.from_dict(state["config"])
            if "DEVICE" not in requested:  # the run's own device, if this machine has it
                try:
                    check_device(saved.DEVICE)
                    requested["DEVICE"] = saved.DEVICE
                except ConfigError:
                    requested["DEVICE"] = default_device()
                    print(f"the run trained on {saved.DEVICE}, which this machine lacks; "
                          f"continuing on {requested['DEVICE']} (not bit-for-bit as one run)")
            # the run's folder is where its checkpoint is now, wherever it was first written
            requested.setdefault("CHECKPOINT_DIR", str(path.parent))
            if saved.OUTPUT_DIR in ("", saved.CHECKPOINT_DIR):
                requested.setdefault("OUTPUT_DIR", requested["CHECKPOINT_DIR"])
            config = config_for_resume(saved, requested).validate()
            print(f"resuming {path} at step {state['step']} (epoch {state['epoch']})")
            return config, state
    config = Config.from_preset(args.preset, **requested).validate()
    if args.preset == "auto" and config.PRESET == "cpu":
        print("no CUDA device here: using --preset cpu (a 0.26M-parameter model that draws "
              "digits in 15 minutes"
              + (" and learns their labels: generate.py --digit 7 draws 7s" if config.CONDITIONAL else "")
              + "); --preset none trains the default model")
    return config, None


def prepare_folders(config: Config, args, resuming: bool) -> Config:
    """Give the run its folders: a new one under runs/ unless given; a given folder
    that holds another run is refused (unless resuming it, or --overwrite)."""
    from utils.runs import RunLock, clear_run, refuse_if_taken

    if args.benchmark:
        return config.replace(OUTPUT_DIR=config.OUTPUT_DIR or "outputs",
                              CHECKPOINT_DIR=config.CHECKPOINT_DIR or "outputs")
    if resuming:  # the run's own folders (build_config)
        return config
    if args.overwrite:
        with RunLock(config.CHECKPOINT_DIR) if config.CHECKPOINT_DIR else contextlib.nullcontext():
            removed = clear_run(config)  # never under a run that is training there
        if removed:
            print(f"--overwrite: removed {len(removed)} files of the previous run")
    else:
        refuse_if_taken(config)
    return config  # empty folders: train_model makes a new run folder


def next_step(latest: Path) -> str:
    """The command that draws from the run just trained ("" if it wrote no checkpoint)."""
    from utils.runs import RUNS_DIR, newest_checkpoint

    if not latest.is_file():
        return ""
    newest = newest_checkpoint() if Path(RUNS_DIR).is_dir() else None
    if newest is not None and newest.resolve() == latest.resolve():
        return f"next: python generate.py   (draws from the newest run; or --checkpoint {latest})"
    return f"next: python generate.py --checkpoint {latest}"


def describe_plan(trainer) -> str:
    """What the run will do and roughly how long it will take on this machine."""
    cfg = trainer.config
    steps_left = trainer.total_steps - trainer.step
    seconds = steps_left * trainer.estimate_step_seconds()
    limit = cfg.MAX_MINUTES * 60 - trainer.elapsed if cfg.MAX_MINUTES else None
    budget = (f"{cfg.EPOCHS} epochs" if trainer.total_steps == cfg.EPOCHS * trainer.steps_per_epoch
              else f"{steps_left / trainer.steps_per_epoch:.1f} epochs")
    if limit is not None and limit < seconds:
        return (f"plan: {_duration(limit)} of training (--max-minutes {cfg.MAX_MINUTES:g}; "
                f"{budget} would take about {_duration(seconds)} here)")
    return (f"plan: {steps_left:,} steps of {cfg.BATCH_SIZE} ({budget}), about "
            f"{_duration(seconds)} on this machine; Ctrl-C saves a checkpoint, --max-minutes "
            f"caps the time")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def train_model(config: Config | None = None, resume: dict | str | None = None,
                progress: bool = True, log=print, plan: bool = False, name: str = ""):
    """Train with `config` (default: `Config.from_preset("auto")`, what `python main.py`
    does) and return (the model with its EMA weights, in eval mode; the loss of every step).

    resume: a checkpoint state or path to continue from. Empty CHECKPOINT_DIR/OUTPUT_DIR
    mean a new folder under runs/ (named with `name`; removed again if the run fails
    before writing anything). Holds the run folder's lock while training. Raises the trainer's exceptions (TrainingInterrupted on Ctrl-C after
    saving, ckpt.SaveError when a checkpoint cannot be written, ...).
    """
    from utils import checkpoint as ckpt
    from utils import distributed as dist
    from utils.runs import RunLock, remove_if_empty, with_run_folders
    from utils.trainer import Trainer

    if isinstance(resume, (str, Path)):
        resume = ckpt.load_checkpoint(resume)
    config = config or Config.from_preset("auto")
    new_folder = not config.CHECKPOINT_DIR
    # under torchrun, rank 0 names (and creates) the run folder for all
    config = dist.broadcast_object(with_run_folders(config, name) if dist.is_main() else None)
    lock = RunLock(config.CHECKPOINT_DIR) if dist.is_main() else contextlib.nullcontext()
    try:
        with lock:
            trainer = Trainer(config, resume=resume, progress=progress, log=log)
            finished = trainer.finished()
            if finished:
                log(f"nothing to do: this run is finished ({finished})")
            else:
                if plan and dist.is_main():
                    log(describe_plan(trainer))
                trainer.fit()
    except BaseException:
        if new_folder and dist.is_main():
            remove_if_empty(config.CHECKPOINT_DIR)
        raise
    trainer.ema.config = trainer.config  # what it was trained with, for the caller
    return trainer.ema, list(trainer.losses)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from utils import distributed as dist

    if dist.launched() and int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # torchrun: only rank 0 talks
    try:
        return _main(args, parser)
    finally:
        dist.shutdown()


def _main(args, parser) -> int:
    from utils import distributed as dist
    from utils.checkpoint import CheckpointError, SaveError
    from utils.classifier import ClassifierError
    from utils.data_loader import MNISTError
    from utils.runs import RunLockedError

    try:
        config, state = build_config(args)
        dist.init(config.DEVICE)  # torchrun: join the others, on the run's own device
        given = config_overrides(args)
        for name in ("GUIDANCE", "CLASS_DROPOUT"):
            if name in given and not config.CONDITIONAL:
                raise ConfigError(f"{flag_for(name)} is for a class-conditional model: add "
                                  f"--conditional (the CPU preset's default)")
        check_device(config.DEVICE)
        config = prepare_folders(config, args, resuming=state is not None)
        check_writable(config.OUTPUT_DIR or "runs", "--output-dir")
        check_writable(config.CHECKPOINT_DIR or "runs", "--checkpoint-dir")
    except (ConfigError, CheckpointError, RunLockedError) as error:
        parser.exit(2, f"main.py: error: {error}\n")

    import torch

    from utils.trainer import TrainingDiverged, TrainingInterrupted

    try:
        if args.benchmark:
            from utils.benchmark import run_benchmark

            if (Path(config.OUTPUT_DIR) / "benchmark.json").exists() and dist.is_main():
                print(f"replacing {Path(config.OUTPUT_DIR) / 'benchmark.json'}")

            run_benchmark(config, progress=not args.quiet)
            return 0
        model, _ = train_model(config, resume=state, progress=not args.quiet, plan=True,
                               name=args.name)
        hint = next_step(Path(model.config.CHECKPOINT_DIR) / "latest.pt")
        if hint:
            print(hint)
    except RunLockedError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except (MNISTError, SaveError, ClassifierError) as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 1
    except CheckpointError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        name, path = stop.args
        if dist.is_main():
            print(f"stopped by {name}; checkpoint saved to {path}\n"
                  f"resume with: python main.py --resume {path}", file=sys.stderr)
        return 130 if name == "SIGINT" else 143
    except dist.PeerLost as error:
        print(f"main.py: error (rank {dist.rank()}): {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("main.py: interrupted; stopped without saving "
              f"(the last checkpoint, if any, is in {config.CHECKPOINT_DIR or 'runs/'})", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 1
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):  # torch < 2.5
        print(f"main.py: error: out of memory on {config.DEVICE} with --batch-size "
              f"{config.BATCH_SIZE}; try a smaller --batch-size (e.g. {max(1, config.BATCH_SIZE // 2)})"
              f" or --model-channels", file=sys.stderr)
        return 1
    except RuntimeError as error:  # after OutOfMemoryError, which is one too
        if not dist.is_initialized():
            raise
        reason = (str(error).strip().splitlines() or ["?"])[0]
        reason = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", reason)[:160]  # gloo's source line
        print(f"main.py: error (rank {dist.rank()}): lost contact with the other processes "
              f"(one died or stopped answering: {reason}); the last good checkpoint is in "
              f"{config.CHECKPOINT_DIR or 'runs/'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from utils.distributed import exit_process

    exit_process(main())
