"""Train a DDPM on MNIST.

    python main.py --epochs 50                  # the default model, on CUDA if present
    python main.py --preset cpu                 # a small model for a laptop CPU
    python main.py --resume auto                # continue the newest run in ./checkpoints
    python main.py --benchmark                  # measure speed; writes outputs/benchmark.json

Every setting of config.Config is a flag (python main.py --help lists them).
"""
from __future__ import annotations

import argparse
import sys

from config import (PRESETS, Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides)


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="main.py", description="Train a DDPM on MNIST (see README.md).",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=36))
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="start from a named group of settings; explicit flags still win")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue a run from a checkpoint; 'auto' takes the newest in "
                             "--checkpoint-dir (or starts afresh if there is none)")
    parser.add_argument("--benchmark", action="store_true",
                        help="measure training and sampling speed instead of training; "
                             "writes benchmark.json to --output-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(parser)
    return parser


def build_config(args) -> tuple[Config, dict | None]:
    """The run's Config (preset, then flags; or the checkpoint's when resuming) and the
    checkpoint state to resume from, if any."""
    from utils import checkpoint as ckpt
    from utils.trainer import config_for_resume

    requested = {**PRESETS.get(args.preset, {}), **config_overrides(args)}
    state = None
    if args.resume and args.preset:
        print(f"--preset {args.preset} ignored: a resumed run keeps its checkpoint's settings")
        requested = config_overrides(args)
    if args.resume:
        folder = requested.get("CHECKPOINT_DIR", Config.CHECKPOINT_DIR)
        path = ckpt.find_latest(folder) if args.resume == "auto" else args.resume
        if path is None:
            print(f"--resume auto: no checkpoint in {folder}; starting a new run")
        else:
            state = ckpt.load_checkpoint(path)
            saved = Config.from_dict(state["config"])
            if "DEVICE" not in requested:  # the run's own device, if this machine has it
                try:
                    check_device(saved.DEVICE)
                    requested["DEVICE"] = saved.DEVICE
                except ConfigError:
                    requested["DEVICE"] = Config().DEVICE
                    print(f"the run trained on {saved.DEVICE}, which this machine lacks; "
                          f"continuing on {requested['DEVICE']} (not bit-for-bit as one run)")
            config = config_for_resume(saved, requested).validate()
            print(f"resuming {path} at step {state['step']} (epoch {state['epoch']})")
            return config, state
    return Config(**requested).validate(), state


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from utils.checkpoint import CheckpointError
    from utils.data_loader import MNISTNotFoundError

    try:
        config, state = build_config(args)
        check_device(config.DEVICE)
        check_writable(config.OUTPUT_DIR, "--output-dir")
        check_writable(config.CHECKPOINT_DIR, "--checkpoint-dir")
    except (ConfigError, CheckpointError) as error:
        parser.exit(2, f"main.py: error: {error}\n")

    import torch

    from utils.trainer import Trainer, TrainingDiverged, TrainingInterrupted

    try:
        if args.benchmark:
            from utils.benchmark import run_benchmark

            run_benchmark(config, progress=not args.quiet)
            return 0
        if config.DEVICE == "cpu" and not args.preset and config.MODEL_CHANNELS >= 64:
            print("note: the default model trains at ~20 images/s on a 2-core CPU (~50 minutes "
                  "an epoch); --preset cpu trains a small model to digits in 15 minutes")
        trainer = Trainer(config, resume=state, progress=not args.quiet)
        finished = trainer.finished()
        if finished:
            print(f"nothing to do: this run is finished ({finished})")
            return 0
        trainer.fit()
    except MNISTNotFoundError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 1
    except CheckpointError as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        name, path = stop.args
        print(f"stopped by {name}; checkpoint saved to {path}\n"
              f"resume with: python main.py --resume {path}", file=sys.stderr)
        return 130 if name == "SIGINT" else 143
    except KeyboardInterrupt:
        print("main.py: interrupted; stopped without saving "
              f"(the last checkpoint, if any, is in {config.CHECKPOINT_DIR})", file=sys.stderr)
        return 130
    except TrainingDiverged as error:
        print(f"main.py: error: {error}", file=sys.stderr)
        return 1
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):  # torch < 2.5
        print(f"main.py: error: out of memory on {config.DEVICE} with --batch-size "
              f"{config.BATCH_SIZE}; try a smaller --batch-size (e.g. {max(1, config.BATCH_SIZE // 2)})"
              f" or --model-channels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
