"""Sample, evaluate, interpolate and edit images from a checkpoint (the model is rebuilt from it).

    python generate.py                                                  # the newest run (or the pretrained model)
    python generate.py --checkpoint runs/NAME/latest.pt                 # a grid, one row per class
    python generate.py --checkpoint pretrained --digit 7                # only 7s, before any training
    python generate.py --checkpoint ckpt.pt --save-npz outputs/samples.npz
    python generate.py --checkpoint ckpt.pt --evaluate                  # FID etc. on 10,000
    python generate.py --evaluate-npz samples.npz                       # any source's samples
    python generate.py --checkpoint ckpt.pt --interpolate --num-steps 10
    python generate.py --checkpoint ckpt.pt --interpolate-real 0 1      # between test images
    python generate.py --checkpoint ckpt.pt --chain                     # the reverse process
    python generate.py --checkpoint cond.pt --digit 0-9 --guidance 0 1 2 4 8   # guidance strip
    python generate.py --checkpoint cond.pt --interpolate-digits 3 8    # a 3 turning into an 8
    python generate.py --inpaint --mask top centre                      # complete hidden parts
    python generate.py --edit --digit 8 --strength 0.3 0.5 0.7          # SDEdit: redraw as 8s

Pictures go to outputs/ under names that are never reused (samples.png, samples-2.png, ...)
unless --output names the file. Each job is one function of sampling/ that a notebook can
call too (see README, "Use it from Python"); this script parses, picks the jobs (JOBS, the
one list of what it can do, each naming its own outputs) and calls them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from config import (Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides, interval_problem)
from sampling.api import (generate_class_interpolation, generate_images, generate_interpolation,
                          load_model)
from sampling.editing import MASKS
from sampling.jobs import (DEFAULT_OUTPUT, EVAL_DEFAULT_SAMPLES, JOBS, Context,
                           choose_checkpoint, describe, evaluate_npz, picture_paths,
                           refuse_without_classes, save_editing_scores)
from sampling.settings import parse_classes
from utils import distributed as dist
from utils import machine
from utils.errors import report_errors
from utils.files import release_unwritten
from utils.visualization import show

__all__ = ["load_model", "generate_images", "generate_interpolation",
           "generate_class_interpolation", "main", "build_parser"]

GUIDANCE_HELP = ("classifier-free guidance scale W of a --conditional checkpoint: eps = eps_uncond "
                 "+ W (eps_cond - eps_uncond); 0 = unconditional, 1 = plain conditional, > 1 = "
                 "guided. TeaPearce's w is W - 1 (his (1+w) eps_c - w eps_u); lucidrains' and "
                 "diffusers' guidance scale is W itself. Several values: one guidance strip "
                 "(columns) or one --evaluate each (default: the checkpoint's setting)")


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="generate.py",
                              description="Generate images from a checkpoint (README.md; every "
                                          "flag: docs/reference.md).")
    _what_to_draw(p.add_argument_group("what to draw"))
    _how_to_sample(p.add_argument_group("how to sample"))
    _other_jobs(p.add_argument_group("other pictures and scores"))
    return p


def _what_to_draw(g) -> None:
    g.add_argument("--checkpoint", help="checkpoint written by main.py, a model folder written "
                                        "by python -m scripts.export, or 'pretrained' (the "
                                        "model that ships with the repo) (default: latest.pt of "
                                        "the newest run in runs/, else pretrained)")
    g.add_argument("--output", help="PNG path of the picture; with several pictures, the grid's, "
                                    "the others beside it (default: samples.png in --output-dir, "
                                    "or samples-2.png etc. if taken: nothing is overwritten)")
    g.add_argument("--num-samples", type=int, metavar="N",
                   help=f"images to draw (default: 10 per class asked for, all classes of a "
                        f"conditional checkpoint, 100 without classes; {EVAL_DEFAULT_SAMPLES:,} "
                        f"with --evaluate)")
    g.add_argument("--digit", "--class", dest="digit", nargs="+", metavar="C",
                   help="draw only these classes (a --conditional checkpoint): 7, a range 0-9, "
                        "a list 1 4 9, or names such as Sneaker; one row per class (default: "
                        "every class of a conditional checkpoint, random images otherwise)")
    g.add_argument("--guidance", type=float, nargs="+", metavar="W", help=GUIDANCE_HELP)
    g.add_argument("--seed", type=int, default=0, help="seed of the noise; image i depends only "
                                                        "on (seed, i) and its class (default: 0)")
    g.add_argument("--save-npz", metavar="PATH",
                   help="also save the images as uint8 (N, H, W) (colour: (N, H, W, 3)) under key "
                        "'samples' (and, for a conditional checkpoint, the class each was drawn "
                        "for under 'labels'); an existing file is replaced whole, and said so")
    g.add_argument("--show", action="store_true", help="open the grid in a window afterwards")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _how_to_sample(g) -> None:
    g.add_argument("--steps", type=int, metavar="N",
                   help="network evaluations per image (default: the checkpoint's setting; "
                        "ddpm always takes all timesteps)")
    g.add_argument("--batch-size", type=int, default=500, metavar="N",
                   help="images per network call; changes speed, not the images (default: 500)")
    g.add_argument("--autoguidance", type=float, nargs="+", metavar="A",
                   help="autoguidance scale (Karras et al. 2024): guide + A (model - guide), "
                        "the guide a weaker version of the model (the checkpoint's early "
                        "snapshot, or --guide); 1 = off; needs no classes. Several values: one "
                        "--evaluate each (default: the checkpoint's setting)")
    g.add_argument("--guide", metavar="CKPT",
                   help="the weaker model for --autoguidance: any checkpoint of the same "
                        "schedule (e.g. an early or smaller run) (default: the checkpoint's "
                        "own early snapshot)")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide (both kinds) only at noise levels LO < sigma <= HI "
                        "(Kynkaanniemi et al. 2024; sigma = sqrt((1 - abar) / abar)); 0 inf = "
                        "at every level (default: the checkpoint's setting)")
    g.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescaling of Lin et al. 2023 (0 = off, 0.7 in their paper); "
                        "see the guidance sweep in docs/ before using it (default: 0)")
    g.add_argument("--raw-weights", action="store_true",
                   help="sample with the raw weights instead of their EMA (for comparison)")
    add_config_arguments(g, names={"SAMPLER", "ETA", "SPACING", "DEVICE", "PRECISION", "DATA_DIR",
                                   "DOWNLOAD", "OUTPUT_DIR", "THREADS"},
                         default_note={**{name: "the checkpoint's setting"
                                          for name in ("SAMPLER", "ETA", "SPACING")},
                                       "PRECISION": "fp32; bf16 autocast is faster on GPUs and on CPUs "
                                                     "with AVX-512 BF16 or AMX",
                                       "OUTPUT_DIR": "outputs", "DATA_DIR": "the checkpoint's"},
                         help_text={
                             "SAMPLER": "sampler for grids, --evaluate and --chain "
                                        "(interpolations decode deterministically: eta 0)",
                             "PRECISION": "sampling precision (auto = bf16 on CUDA and on CPUs "
                                          "that compute it natively)",
                             "OUTPUT_DIR": "where pictures without --output and --evaluate's "
                                           "JSON go",
                             "DATA_DIR": "where the checkpoint's dataset is (test images, "
                                         "evaluation)"})


def _other_jobs(g) -> None:
    g.add_argument("--evaluate", action="store_true",
                   help="score the samples (FID, coverage, confidence; for a conditional "
                        "checkpoint as many of each class and the share classified as the class "
                        "asked for) against the dataset's test set; JSON goes to --output-dir")
    g.add_argument("--evaluate-npz", metavar="PATH",
                   help="score an existing .npz of images (key 'samples', uint8 (N, H, W); "
                        "optional 'labels', the classes asked for, adds the conditional "
                        "accuracy) against MNIST, or the --checkpoint's dataset")
    g.add_argument("--interpolate", action="store_true",
                   help="decode a spherical path between pairs of noise vectors (a "
                        "conditional checkpoint: row r keeps the r-th --digit, default all)")
    g.add_argument("--interpolate-real", type=int, nargs=2, metavar=("I", "J"),
                   help="interpolate between test-set images number I and J, inverted to noise "
                        "by DDIM (a conditional checkpoint: with their labels)")
    g.add_argument("--interpolate-digits", type=str, nargs=2, metavar=("A", "B"),
                   help="a --conditional checkpoint's class A turning into B at fixed noise "
                        "(the class embedding interpolated), one row per --pairs")
    g.add_argument("--num-steps", type=int, default=10, metavar="K",
                   help="images along each interpolation (default: 10)")
    g.add_argument("--pairs", type=int, default=6, help="interpolation rows (default: 6)")
    g.add_argument("--inversion-steps", type=int, default=100, metavar="N",
                   help="DDIM steps for inverting real images (default: 100)")
    g.add_argument("--chain", action="store_true",
                   help="picture of the reverse process x_T -> x_0 (PNG grid and animated GIF)")
    g.add_argument("--forward", action="store_true",
                   help="picture of the forward (noising) process on test images")
    _editing(g)


def _editing(g) -> None:
    g.add_argument("--inpaint", action="store_true",
                   help="complete test images where --mask hides them (RePaint: known pixels "
                        "kept exactly); a conditional checkpoint completes from the known "
                        "pixels alone, or toward --digit")
    g.add_argument("--mask", nargs="+", default=["top"], metavar="M",
                   help=f"what --inpaint hides: {', '.join(MASKS)}, or a PNG of the image's "
                        f"size (white = known); several: one picture (and score) each "
                        f"(default: top)")
    g.add_argument("--resample", type=int, default=4, metavar="R",
                   help="RePaint's passes per step: more is slower and more coherent; 1 is the "
                        "plain replacement method (default: 4)")
    g.add_argument("--completions", type=int, default=4, metavar="K",
                   help="completions of each image in the --inpaint picture (default: 4)")
    g.add_argument("--edit", action="store_true",
                   help="SDEdit: noise test images to each --strength and denoise them "
                        "toward --digit (a conditional checkpoint; default: each image's own "
                        "class)")
    g.add_argument("--strength", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0],
                   metavar="S", help="how much of each input --edit gives up: 0 keeps it, 1 "
                                     "ignores it (default: 0.25 0.5 0.75 1)")
    g.add_argument("--inputs", type=int, default=8, metavar="N",
                   help="test images --inpaint and --edit work on: the first N (default: 8; "
                        "with --evaluate, the share of them read as the right class)")
    g.add_argument("--input", nargs="+", metavar="FILE|I",
                   help="what --inpaint and --edit work on instead: your image files (resized "
                        "to the model's) and/or test-set indices")


def check_args(args, parser) -> None:
    for name in ("num_samples", "batch_size", "steps", "num_steps", "pairs", "inversion_steps",
                 "resample", "completions", "inputs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:  # the flags that are Config fields, and the seed: the same checks as main.py's
        Config(**config_overrides(args), SEED=args.seed).validate()
    except ConfigError as error:
        parser.error(str(error))
    if args.output and Path(args.output).suffix.lower() != ".png":
        parser.error(f"--output must be a .png path, got {args.output}")
    if args.save_npz and Path(args.save_npz).suffix.lower() != ".npz":
        parser.error(f"--save-npz must be a .npz path, got {args.save_npz}")
    for flag, path in (("--output", args.output), ("--save-npz", args.save_npz)):
        if path and Path(path).is_dir():
            parser.error(f"{flag} {path} is a folder; name a file in it")
    if args.digit is not None:
        try:
            args.digit = parse_classes(args.digit)
        except ValueError as error:
            parser.error(str(error))
    for w in args.guidance or ():
        if not 0 <= w < float("inf"):
            parser.error(f"--guidance must be a finite number >= 0 (0 = unconditional, "
                         f"1 = plain conditional, > 1 = guided), got {w:g}")
    if not 0 <= args.guidance_rescale <= 1:
        parser.error(f"--guidance-rescale must lie in [0, 1], got {args.guidance_rescale:g}")
    for a in args.autoguidance or ():
        if not 0 <= a < float("inf"):
            parser.error(f"--autoguidance must be a finite number >= 0 (1 = off), got {a:g}")
    if problem := interval_problem(args.guidance_interval):
        parser.error(problem)
    if args.save_npz and len(args.guidance or ()) * len(args.autoguidance or [1]) > 1:
        parser.error("--save-npz takes one --guidance and one --autoguidance value")
    for s in args.strength:
        if not 0 <= s <= 1:
            parser.error(f"--strength must lie in [0, 1] (0 keeps the input, 1 ignores it), "
                         f"got {s:g}")


def run(args) -> int:
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", Config().DEVICE)
    out_dir = Path(overrides.get("OUTPUT_DIR") or DEFAULT_OUTPUT.parent)
    shared = machine.share_cpu(overrides.get("THREADS", 0), device)  # e.g. beside a training run
    if shared and not args.quiet:
        print(shared)
    if dist.launched():  # torchrun: the samples are split between the processes
        dist.init(device)
        device = dist.local_device(device)
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")
    check_device(device)
    progress = not args.quiet and dist.is_main()
    jobs = [] if args.evaluate_npz and not args.checkpoint else \
        [job for job in JOBS if job.wanted(args)]
    paths = picture_paths(args, jobs, out_dir) if jobs else {}
    for folder in {p.parent for p in paths.values()}:
        check_writable(folder, "--output")
    if args.evaluate or args.evaluate_npz:  # their JSON goes to --output-dir
        check_writable(out_dir, "--output-dir")
    if args.save_npz:
        check_writable(Path(args.save_npz).parent, "--save-npz")
    if args.evaluate_npz and dist.is_main():
        config = load_model(args.checkpoint, "cpu").config if args.checkpoint else None
        evaluate_npz(args, config, out_dir, progress)
    if not jobs:
        return 0
    args.checkpoint = choose_checkpoint(args)
    model = load_model(args.checkpoint, device, ema=not args.raw_weights)
    try:
        if args.guide:
            model.set_guide(load_model(args.guide, device))
        elif any(a != 1 for a in args.autoguidance or ()):
            model.check_guide(model.guide)
    except ValueError as error:
        raise ConfigError(f"--guide {args.guide}: {error}" if args.guide else
                          f"--autoguidance: {error}") from None
    refuse_without_classes(args, model.config)
    ctx = Context.of(args, model, out_dir, paths, progress)
    describe(ctx)
    written = []
    for job in jobs:
        if dist.is_main() or job.name == "grid":  # only the grid's draw is split
            written += job.run(ctx)
    written += save_editing_scores(ctx)
    for path in written:
        print(f"wrote {path}")
    if args.show and written:
        show(written[0])
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    # errors about classes name the flag as the user spelled it (--class or --digit)
    args.class_flag = "--class" if any(str(a).startswith("--cl") for a in given) else "--digit"
    check_args(args, parser)
    try:
        return report_errors("generate.py", lambda: run(args),
                             oom_hint="try a smaller --batch-size or --num-samples",
                             interrupted="the files listed above as written are complete")
    finally:
        release_unwritten()  # names claimed for pictures that were never drawn
        dist.shutdown()


if __name__ == "__main__":
    dist.exit_process(main())
