"""Train a diffusion model on MNIST (or Fashion-MNIST, or your own folder of images).

    python main.py                              # the right model for this machine, new run folder
    python main.py --epochs 50                  # the default model on CUDA (the CPU preset on a CPU)
    python main.py --preset cpu                 # a small model for a laptop CPU: digits in 15 minutes
    python main.py --dataset fashion-mnist      # clothing instead of digits
    python main.py --resume auto                # continue the newest run in ./runs, exactly
    python main.py --benchmark                  # measure speed; writes outputs/benchmark.json
    torchrun --nproc_per_node 4 main.py         # the same run on 4 GPUs (docs/training.md)

Every setting of config.Config is a flag (python main.py --help lists them, grouped). From
Python: `from main import train_model` (training/run.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from config import (NOT_FLAGS, PRESETS, Config, ConfigError, OneLineArgumentParser,
                    add_config_arguments,
                    check_device, check_writable, config_overrides, flag_for)
from training.benchmark import run_benchmark
from training.distill import distillation_config
from training.run import (find_resume_checkpoint, next_step, prepare_folders, resumed_config,
                          train_model)
from utils import checkpoint as ckpt
from utils import distributed as dist
from utils.errors import report_errors
from utils.runs import check_name

__all__ = ["train_model", "main", "build_parser"]


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="main.py", description="Train a diffusion model (README.md; every flag: "
                                    "docs/reference.md). Defaults shown are this machine's.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=36))
    run = parser.add_argument_group("the run")
    presets = ["auto", *PRESETS]
    run.add_argument("--preset", choices=presets, default="auto",
                     metavar="{" + ",".join(presets) + "}",
                     help="start from a named group of settings: cpu (a small model, digits "
                          "in 15 minutes on a laptop), none (the defaults, for a GPU), auto "
                          "(cpu without CUDA, none with it); explicit flags still win "
                          "(default: auto)")
    run.add_argument("--name", default="",
                     help="a word for the run folder: runs/<date>-<time>-<preset>-<name>")
    run.add_argument("--resume", metavar="PATH|auto",
                     help="continue a run from a checkpoint; 'auto' takes the newest run in "
                          "runs/ (or in --checkpoint-dir), or starts afresh if there is none")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in a --checkpoint-dir / --output-dir that holds "
                          "another run, deleting that run's checkpoints and outputs")
    run.add_argument("--benchmark", action="store_true",
                     help="measure training and sampling speed of the model the flags describe "
                          "instead of training; writes benchmark.json to --output-dir "
                          "(default: outputs/)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    fields = {f.name for f in dataclasses.fields(Config)} - NOT_FLAGS
    add_config_arguments(parser, names=fields, preset="auto", groups=True,
                         default_note={"CHECKPOINT_DIR": "a new folder runs/<date>-<time>-<preset>",
                                       "OUTPUT_DIR": "the checkpoint folder"})
    return parser


def build_config(args) -> tuple[Config, dict | None]:
    """The run's Config (preset, then flags; or the checkpoint's when resuming) and the
    checkpoint state to resume from, if any."""
    requested = config_overrides(args)
    if args.resume:
        if args.preset != "auto":
            print(f"--preset {args.preset} ignored: a resumed run keeps its checkpoint's settings")
        path = find_resume_checkpoint(args.resume, requested.get("CHECKPOINT_DIR"))
        if path is not None:
            state = ckpt.load_checkpoint(path)
            config = resumed_config(path, state, requested)
            print(f"resuming {path} at step {state['step']} (epoch {state['epoch']})")
            return config, state
    if requested.get("DISTILL"):
        config = distillation_config(requested["DISTILL"], requested)
        steps = config.STUDENT_STEPS
        print(f"distilling {config.DISTILL} ({config.DISTILL_METHOD}) into a student of "
              f"{steps} step{'s' if steps != 1 else ''}")
        return config, None
    config = Config.from_preset(args.preset, **requested).validate()
    if args.preset == "auto" and config.PRESET == "cpu":
        print("no CUDA device on this machine: using --preset cpu (a small UNet that draws "
              "images in 15 minutes"
              + ((" and learns their classes: generate.py --digit 7 draws 7s"
                  if config.DATASET == "mnist" else " and learns their classes: generate.py "
                  "--class NAME draws one") if config.CONDITIONAL else
                 f" and, without the labels, learns {config.CLUSTERS} k-means clusters of the "
                 f"images as its classes (--clusters 0: none)" if config.CLUSTERS else "")
              + f"); {config.MODEL_CHANNELS} channels" + (
                  " for this budget: wider models make a half to a third of the steps on 2 "
                  "cores and lost at 15 and at 60 minutes "
                  "(docs/training.md#model-size-for-the-budget)"
                  if "MODEL_CHANNELS" not in requested else " as asked")
              + "; --preset none trains the default model")
    return config, None


def check_request(args, config: Config) -> None:
    """What can be refused before anything is loaded."""
    check_name(args.name)
    given = config_overrides(args)
    for name in ("GUIDANCE", "CLASS_DROPOUT"):
        if name in given and not config.num_classes:
            raise ConfigError(f"{flag_for(name)} is for a class-conditional model: add "
                              f"--conditional (the CPU preset's default) or --clusters K")
    check_device(config.DEVICE)
    if config.LOG == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("--log tensorboard needs the tensorboard package: pip install "
                              "tensorboard (it is in requirements.txt)") from None


def run(args) -> int:
    if dist.launched() and int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # torchrun: only rank 0 talks
    config, state = build_config(args)
    dist.init(config.DEVICE)  # torchrun: join the others, on the run's own device
    check_request(args, config)
    if args.benchmark:
        config = config.replace(OUTPUT_DIR=config.OUTPUT_DIR or "outputs",
                                CHECKPOINT_DIR=config.CHECKPOINT_DIR or "outputs")
        check_writable(config.OUTPUT_DIR, "--output-dir")
        if (Path(config.OUTPUT_DIR) / "benchmark.json").exists() and dist.is_main():
            print(f"replacing {Path(config.OUTPUT_DIR) / 'benchmark.json'}")
        run_benchmark(config, progress=not args.quiet)
        return 0
    if state is None:
        config, removed = prepare_folders(config, args.overwrite)
        if removed:
            print(f"--overwrite: removed {len(removed)} files of the previous run")
    check_writable(config.OUTPUT_DIR or "runs", "--output-dir")
    check_writable(config.CHECKPOINT_DIR or "runs", "--checkpoint-dir")
    model, _ = train_model(config, resume=state, progress=not args.quiet, plan=True,
                           name=args.name)
    hint = next_step(Path(model.config.CHECKPOINT_DIR) / ckpt.LATEST)
    if hint:
        print(hint)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    batch = args.BATCH_SIZE or Config.from_preset(args.preset).BATCH_SIZE
    try:
        return report_errors("main.py", lambda: run(args),
                             oom_hint=f"with --batch-size {batch}: try a smaller --batch-size "
                                      f"(e.g. {max(1, batch // 2)}) or --model-channels",
                             interrupted="stopped before training began; nothing was saved")
    finally:
        dist.shutdown()


if __name__ == "__main__":
    dist.exit_process(main())
