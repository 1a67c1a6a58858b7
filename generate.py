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

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from config import (Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides)
from evaluation.metrics import Evaluator, format_report
from evaluation.npz import load_samples, write_samples
from sampling import pretrained
from evaluation.classifier import predict
from sampling.api import (chain, draw, edit_images, forward_process,
                          generate_class_interpolation, generate_images, generate_interpolation,
                          guidance_strip, inpaint_images, interpolate_real, load_model,
                          save_grid, settings_for, test_images, test_set)
from sampling.editing import MASKS, load_mask, make_mask
from sampling.settings import (arrange, choose_classes, default_count, format_classes, labels_for,
                               row_labels)
from utils import distributed as dist
from utils.data_loader import normalize_images, to_uint8
from utils.datasets import open_dataset
from utils.errors import report_errors
from utils.files import save_json, unused
from utils.runs import newest_checkpoint
from utils.visualization import show

__all__ = ["load_model", "generate_images", "generate_interpolation",
           "generate_class_interpolation", "main", "build_parser"]

EVAL_DEFAULT_SAMPLES = 10_000
DEFAULT_OUTPUT = Path("outputs") / "samples.png"
GUIDANCE_HELP = ("classifier-free guidance scale W of a --conditional checkpoint: eps = eps_uncond "
                 "+ W (eps_cond - eps_uncond); 0 = unconditional, 1 = plain conditional, > 1 = "
                 "guided. TeaPearce's w is W - 1 (his (1+w) eps_c - w eps_u); lucidrains' and "
                 "diffusers' guidance scale is W itself. Several values: one guidance strip "
                 "(columns) or one --evaluate each (default: the checkpoint's setting)")


def parse_digits(tokens: list[str]) -> list:
    """['7'] -> [7]; ['0-9'] -> [0, ..., 9]; ['1', '4', '9'] -> [1, 4, 9]; a name such as
    'Sneaker' stays a name (checked against the checkpoint's classes later). ValueError
    names a range that is not one."""
    classes = []
    for token in tokens:
        low, dash, high = token.partition("-")
        if low.isdigit() and (not dash or high.isdigit()):
            first, last = int(low), int(high if dash else low)
            if first > last:
                raise ValueError(f"--digit {token}: a range goes up, e.g. {last}-{first}")
            classes += range(first, last + 1)
        elif low.isdigit() and dash:
            raise ValueError(f"--digit {token}: expected a class 0-9, a range such as 0-9, or "
                             f"a list such as 1 4 9")
        else:
            classes.append(token)
    return classes


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="generate.py",
                              description="Generate images from a checkpoint (README.md; every "
                                          "flag: docs/reference.md).")
    _what_to_draw(p.add_argument_group("what to draw"))
    _how_to_sample(p.add_argument_group("how to sample"))
    _other_jobs(p.add_argument_group("other pictures and scores"))
    return p


def _what_to_draw(g) -> None:
    g.add_argument("--checkpoint", help="checkpoint written by main.py, or 'pretrained' (the "
                                        "model that ships with the repo) (default: latest.pt of "
                                        "the newest run in runs/, else pretrained)")
    g.add_argument("--output", help="PNG path of the picture; with several pictures, the grid's, "
                                    "the others beside it (default: outputs/samples.png, or "
                                    "samples-2.png etc. if taken: nothing is overwritten)")
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
    g.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescaling of Lin et al. 2023 (0 = off, 0.7 in their paper); "
                        "see the guidance sweep in docs/ before using it (default: 0)")
    g.add_argument("--raw-weights", action="store_true",
                   help="sample with the raw weights instead of their EMA (for comparison)")
    add_config_arguments(g, names={"SAMPLER", "ETA", "SPACING", "DEVICE", "PRECISION", "DATA_DIR",
                                   "DOWNLOAD", "OUTPUT_DIR", "THREADS"},
                         default_note={**{name: "the checkpoint's setting"
                                          for name in ("SAMPLER", "ETA", "SPACING")},
                                       "PRECISION": "fp32; bf16 autocast is faster on GPUs",
                                       "OUTPUT_DIR": "outputs", "DATA_DIR": "the checkpoint's"},
                         help_text={
                             "SAMPLER": "sampler for grids, --evaluate and --chain "
                                        "(interpolations decode deterministically: eta 0)",
                             "PRECISION": "sampling precision (auto = bf16 on CUDA)",
                             "OUTPUT_DIR": "where --evaluate writes its JSON",
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
            args.digit = parse_digits(args.digit)
        except ValueError as error:
            parser.error(str(error))
    for w in args.guidance or ():
        if not 0 <= w < float("inf"):
            parser.error(f"--guidance must be a finite number >= 0 (0 = unconditional, "
                         f"1 = plain conditional, > 1 = guided), got {w:g}")
    if not 0 <= args.guidance_rescale <= 1:
        parser.error(f"--guidance-rescale must lie in [0, 1], got {args.guidance_rescale:g}")
    if args.save_npz and len(args.guidance or ()) > 1:
        parser.error("--save-npz takes one --guidance value")
    for s in args.strength:
        if not 0 <= s <= 1:
            parser.error(f"--strength must lie in [0, 1] (0 keeps the input, 1 ignores it), "
                         f"got {s:g}")


# ----- the jobs -----
@dataclass
class Context:
    """What the jobs share: the request, the model, its settings and the output folder."""
    args: argparse.Namespace
    model: object
    out_dir: Path
    data_dir: str | None
    download: bool
    progress: bool
    paths: dict = field(default_factory=dict)
    evaluator_factory: Callable | None = None
    results: dict = field(default_factory=dict)  # scores of the editing jobs, for the JSON

    @functools.cached_property
    def config(self) -> Config:
        return self.model.config

    @functools.cached_property
    def classes(self) -> list[int] | None:
        return choose_classes(self.config, self.args.digit, self.args.class_flag)

    @functools.cached_property
    def guidances(self) -> list[float]:
        return self.args.guidance or [self.config.GUIDANCE]

    def settings(self, guidance: float | None = None, **changes):
        args, given = self.args, config_overrides(self.args)
        options = dict(sampler=given.get("SAMPLER"), steps=args.steps, eta=given.get("ETA"),
                       spacing=given.get("SPACING"), guidance=guidance,
                       guidance_rescale=args.guidance_rescale,
                       precision=given.get("PRECISION", "fp32"))
        return settings_for(self.model, **{**options, **changes})

    def evaluator(self):
        return self.evaluator_factory(self.config)


def job_samples(ctx: Context) -> list[Path]:
    """The grid (and --save-npz, --evaluate): one draw per --guidance value."""
    args, written, results = ctx.args, [], []
    count = args.num_samples or (EVAL_DEFAULT_SAMPLES if args.evaluate
                                 else default_count(ctx.classes))
    if args.evaluate:
        ctx.evaluator()  # the data and the classifier before the long draw: fail fast
    for guidance in ctx.guidances:
        settings = ctx.settings(guidance)
        start = time.perf_counter()
        images = draw(ctx.model, count, settings, ctx.classes, args.seed, args.batch_size,
                      ctx.progress)
        seconds = time.perf_counter() - start
        if not dist.is_main():
            continue  # rank 0 writes and scores
        print(f"sampled {count:,} images in {seconds:.1f} s ({count / seconds:.3g} images/s)"
              + (f" at guidance {guidance:g}" if ctx.classes else ""))
        if "grid" in ctx.paths:
            shown, nrow = arrange(images, ctx.classes, per_class=10)
            written.append(save_grid(shown, nrow, row_labels(ctx.config, ctx.classes),
                                     ctx.paths["grid"]))
        labels = labels_for(ctx.classes, count)
        if args.save_npz:
            replaced = Path(args.save_npz).exists()
            written.append(write_samples(args.save_npz, to_uint8(images), labels))
            if replaced:
                print(f"replaced {args.save_npz} (as --save-npz asked)")
        if args.evaluate:
            results.append(evaluate_images(ctx, images, labels, settings, seconds))
    if len(results) > 1:
        print(format_sweep(results))
    return written


def evaluate_images(ctx: Context, images, labels, settings, seconds: float) -> dict:
    """Score a draw, print the report, then write its JSON (results first: a full disk
    cannot hide them)."""
    args = ctx.args
    result = ctx.evaluator().evaluate(images, labels=labels)
    result.update(checkpoint=str(args.checkpoint), sampler=settings.label, seed=args.seed,
                  sampling_seconds=seconds, device=str(ctx.model.scheduler.betas.device),
                  sampling_precision=settings.precision, raw_weights=args.raw_weights,
                  dataset=ctx.config.DATASET)
    name = f"eval_{Path(str(args.checkpoint)).stem}_{settings.label}"
    if ctx.classes:
        result.update(guidance=settings.guidance, guidance_rescale=settings.guidance_rescale,
                      classes=ctx.classes)
        name += f"_w{settings.guidance:g}" + (f"_rescale{settings.guidance_rescale:g}"
                                              if settings.guidance_rescale else "")
    name += f"{'_raw' if args.raw_weights else ''}_n{len(images)}.json"
    print(format_report(result, f"{args.checkpoint} ({settings.label}):"))
    path = save_json(result, unused(ctx.out_dir / name))
    print(f"metrics written to {path}")
    return result


def job_guidance_strip(ctx: Context) -> list[Path]:
    classes = ctx.classes or []
    print(f"guidance strip: classes {format_classes(ctx.config, classes)} at W = "
          f"{', '.join(f'{w:g}' for w in ctx.guidances)}")
    settings = ctx.settings()
    guidance_strip(ctx.model, classes, ctx.guidances, seed=ctx.args.seed,
                   save_path=ctx.paths["guidance"], sampler=settings.sampler,
                   steps=settings.steps, eta=settings.eta, spacing=settings.spacing,
                   guidance_rescale=settings.guidance_rescale, precision=settings.precision)
    return [ctx.paths["guidance"]]


def job_interpolation(ctx: Context) -> list[Path]:
    args = ctx.args
    settings = ctx.settings(ctx.guidances[0], sampler="ddim", eta=0.0,
                            steps=args.steps or min(ctx.config.SAMPLING_STEPS,
                                                    ctx.config.TIMESTEPS))
    print(f"interpolation between noise vectors: DDIM with {settings.steps} steps, eta 0 "
          f"(deterministic)" + (f"; classes {format_classes(ctx.config, ctx.classes)}, "
                                f"guidance {settings.guidance:g}" if ctx.classes else ""))
    generate_interpolation(ctx.model, args.num_steps, save_path=ctx.paths["interpolation"],
                           pairs=args.pairs, seed=args.seed, steps=settings.steps,
                           precision=settings.precision, digits=ctx.classes,
                           guidance=settings.guidance, guidance_rescale=settings.guidance_rescale)
    return [ctx.paths["interpolation"]]


def job_interpolation_real(ctx: Context) -> list[Path]:
    args = ctx.args
    i, j = args.interpolate_real
    images, labels = test_images(ctx.model, (i, j), ctx.data_dir, ctx.download)
    names = ctx.config.class_names
    _, error = interpolate_real(ctx.model, images[0], images[1], args.num_steps,
                                args.inversion_steps, labels if ctx.config.CONDITIONAL else None,
                                ctx.settings().precision, ctx.paths["interpolation_real"])
    print(f"test images #{i} (a {names[labels[0]]}) and #{j} (a {names[labels[1]]}) at both "
          f"ends, inverted and decoded by DDIM with {args.inversion_steps} steps; reconstruction "
          f"error {error:.4f} (mean |pixel| in [-1, 1])")
    return [ctx.paths["interpolation_real"]]


def job_interpolation_classes(ctx: Context) -> list[Path]:
    args = ctx.args
    first, last = args.interpolate_digits
    settings = ctx.settings(ctx.guidances[0]).deterministic()
    print(f"class {first} turning into {last}: {settings.sampler} with {settings.steps} steps, "
          f"eta 0, guidance {settings.guidance:g}, {args.pairs} rows")
    generate_class_interpolation(ctx.model, first, last, args.num_steps,
                                 save_path=ctx.paths["interpolation_digits"], pairs=args.pairs,
                                 seed=args.seed, guidance=settings.guidance,
                                 steps=settings.steps, precision=settings.precision,
                                 sampler=settings.sampler, spacing=settings.spacing,
                                 guidance_rescale=settings.guidance_rescale)
    return [ctx.paths["interpolation_digits"]]


def job_chain(ctx: Context) -> list[Path]:
    count = min(ctx.args.num_samples or 8, 16)
    settings = ctx.settings(ctx.guidances[0])
    print(f"reverse process of {count} samples: {settings.label}")
    chain(ctx.model, count, settings, ctx.args.digit, ctx.args.seed, ctx.paths["chain"],
          ctx.paths["chain_gif"], progress=ctx.progress)
    return [ctx.paths["chain"], ctx.paths["chain_gif"]]


def job_forward(ctx: Context) -> list[Path]:
    images, _ = test_images(ctx.model, range(8), ctx.data_dir, ctx.download)
    forward_process(ctx.model, images, save_path=ctx.paths["forward"])
    return [ctx.paths["forward"]]


def job_inpaint(ctx: Context) -> list[Path]:
    """--inpaint: one picture per --mask; with --evaluate, the share of completions read
    as the original class, RePaint beside the plain replacement method."""
    args, written = ctx.args, []
    images, labels = first_test_images(ctx)
    steps = args.steps or ctx.config.SAMPLING_STEPS
    side = ctx.config.IMAGE_SIZE
    for name in args.mask:
        mask = load_mask(name, side) if name.lower().endswith(".png") else \
            make_mask(name, len(images), side, args.seed)
        path = ctx.paths["inpaint"] if len(args.mask) == 1 else ctx.paths["inpaint"].with_name(
            f"{ctx.paths['inpaint'].stem}_{Path(name).stem}.png")
        print(f"inpainting {len(images)} test images, mask {name}: RePaint, {steps} steps x "
              f"{args.resample} passes"
              + (f", toward {format_classes(ctx.config, ctx.classes)}" if args.digit else
                 ", from the known pixels alone" if ctx.config.CONDITIONAL else ""))
        shown = min(len(images), 8) if args.evaluate else len(images)
        inpaint_images(ctx.model, images[:shown], mask[:shown], args.completions, steps,
                       args.resample, args.digit, ctx.guidances[0], args.seed,
                       ctx.settings().precision, save_path=path, batch_size=args.batch_size)
        written.append(path)
        if args.evaluate:
            scores = [{"mask": Path(name).stem, **score_inpainting(ctx, images, labels, mask,
                                                                    steps, r)}
                      for r in dict.fromkeys((args.resample, 1))]
            print(format_editing(scores, "mask " + Path(name).stem))
            ctx.results.setdefault("inpaint", []).extend(scores)
    return written


def first_test_images(ctx: Context):
    """The first --inputs test images and their labels (ConfigError if there are fewer)."""
    images, labels = test_set(ctx.model, ctx.data_dir, ctx.download)
    if ctx.args.inputs > len(images):
        raise ConfigError(f"--inputs {ctx.args.inputs}: the test set has {len(images):,} images")
    return images[:ctx.args.inputs], labels[:ctx.args.inputs]


def score_inpainting(ctx: Context, images, labels, mask, steps: int, resample: int) -> dict:
    start = time.perf_counter()
    filled = inpaint_images(ctx.model, images, mask, 1, steps, resample, ctx.args.digit,
                            ctx.guidances[0], ctx.args.seed, ctx.settings().precision,
                            batch_size=ctx.args.batch_size)[:, 0]
    target = labels_for(ctx.classes, len(images)) if ctx.args.digit else labels
    known = mask.expand_as(filled) == 1
    error = (filled - normalize_images(images))[known].abs().max().item() if known.any() else 0.0
    return {"method": "RePaint" if resample > 1 else "replacement (no resampling)",
            "resample": resample, "steps": steps, "inputs": len(images),
            "right_class": right_class(ctx, filled, target), "known_pixel_error": error,
            "seconds": time.perf_counter() - start}


def job_edit(ctx: Context) -> list[Path]:
    """--edit: SDEdit over --strength; with --evaluate, the share read as the class aimed
    at and the distance to the input at each strength."""
    args = ctx.args
    images, labels = first_test_images(ctx)
    if args.evaluate:
        ctx.evaluator()
    own = labels if ctx.config.CONDITIONAL and not args.digit else None
    settings = ctx.settings(ctx.guidances[0])
    print(f"SDEdit of {len(images)} test images at strength {', '.join(f'{s:g}' for s in args.strength)}"
          f": {settings.label}, guidance {settings.guidance:g}, toward "
          + (format_classes(ctx.config, ctx.classes) if args.digit else
             "each image's own class" if own is not None else "nothing in particular"))
    options = dict(sampler=settings.sampler, steps=settings.steps, eta=settings.eta,
                   spacing=settings.spacing, guidance=settings.guidance,
                   guidance_rescale=settings.guidance_rescale, precision=settings.precision)
    shown = min(len(images), 8) if args.evaluate else len(images)
    edit_images(ctx.model, images[:shown], args.strength, args.digit, args.seed,
                ctx.paths["edit"], args.batch_size, None if own is None else own[:shown],
                **options)
    if args.evaluate:
        edited = edit_images(ctx.model, images, args.strength, args.digit, args.seed,
                             batch_size=args.batch_size, labels=own, **options)
        target = labels_for(ctx.classes, len(images)) if args.digit else labels
        real = normalize_images(images)
        scores = [{"strength": s, "inputs": len(images),
                   "right_class": right_class(ctx, edited[:, k], target),
                   "distance_to_input": ((edited[:, k] - real).abs() / 2).mean().item()}
                  for k, s in enumerate(args.strength)]
        print(format_editing(scores, "SDEdit toward " + (format_classes(ctx.config, ctx.classes)
                                                         if args.digit else "own class")))
        ctx.results["edit"] = scores
    return [ctx.paths["edit"]]


def right_class(ctx: Context, images, target) -> float:
    """The share of `images` the evaluation classifier reads as `target`."""
    _, probs = predict(ctx.evaluator().classifier, images)
    return float((probs.argmax(1) == target.cpu()).double().mean())


def format_editing(scores: list[dict], title: str) -> str:
    lines = [title]
    for s in scores:
        what = (f"  {s['method']} (x{s['resample']})" if "method" in s
                else f"  strength {s['strength']:g}")
        lines.append(f"{what:<40} right class {100 * s['right_class']:5.1f}%"
                     + (f"   known pixels changed by at most {s['known_pixel_error']:.2g}"
                        if "known_pixel_error" in s else
                        f"   distance to the input {s['distance_to_input']:.3f}"))
    return "\n".join(lines)


@dataclass(frozen=True)
class Job:
    name: str  # also the key of its picture in Context.paths
    suffix: str  # of its picture's name: samples{suffix}.png
    wanted: Callable  # args -> bool
    run: Callable  # Context -> list of written paths
    gif: bool = False  # a GIF beside the PNG
    picture: Callable = lambda args: True  # whether it draws a picture (args -> bool)


def _strip(args) -> bool:
    return len(args.guidance or ()) > 1  # several guidance scales: a strip, not a grid


def _pictures_only(args) -> bool:
    return any(job.wanted(args) for job in JOBS if job.name != "grid")


JOBS = (
    Job("grid", "", lambda a: not _pictures_only(a) or a.save_npz
        or (a.evaluate and not (a.inpaint or a.edit)), job_samples,
        picture=lambda a: not _strip(a)),  # several guidance scales: a strip instead
    Job("guidance", "_guidance", _strip, job_guidance_strip),
    Job("interpolation", "_interpolation", lambda a: a.interpolate, job_interpolation),
    Job("interpolation_real", "_interpolation_real_{0}_{1}",
        lambda a: a.interpolate_real, job_interpolation_real),
    Job("interpolation_digits", "_digits_{0}_to_{1}", lambda a: a.interpolate_digits,
        job_interpolation_classes),
    Job("chain", "_chain", lambda a: a.chain, job_chain, gif=True),
    Job("forward", "_forward", lambda a: a.forward, job_forward),
    Job("inpaint", "_inpaint", lambda a: a.inpaint, job_inpaint),
    Job("edit", "_edit", lambda a: a.edit, job_edit),
)


def picture_paths(args, jobs) -> dict[str, Path]:
    """Where each job's picture goes. One picture asked for: --output is its path.
    Several: --output is the first's and the others take its name plus their suffix. No
    --output: outputs/samples*.png, numbered so that no existing file is overwritten."""
    def suffix(job) -> str:
        values = {"interpolation_real": args.interpolate_real,
                  "interpolation_digits": args.interpolate_digits}.get(job.name) or ()
        return job.suffix.format(*values)

    jobs = [job for job in jobs if job.picture(args)]

    def named(base: Path) -> dict[str, Path]:
        paths = {}
        for job in jobs:
            path = base if (len(jobs) == 1 and args.output) else base.with_name(
                base.stem + suffix(job) + ".png")
            paths[job.name] = path
            if job.gif:
                paths[f"{job.name}_gif"] = path.with_suffix(".gif")
        return paths

    if args.output:
        return named(Path(args.output))
    for k in range(1, 100_000):
        base = DEFAULT_OUTPUT if k == 1 else DEFAULT_OUTPUT.with_name(f"samples-{k}.png")
        paths = named(base)
        if not any(p.exists() for p in paths.values()):
            return paths
    raise ConfigError(f"{DEFAULT_OUTPUT.parent} holds too many pictures; name one with --output")


def format_sweep(results: list[dict]) -> str:
    """One line per guidance scale: the table of the guidance sweep."""
    lines = [f"{'guidance':>9} {'FID':>8} {'asked-for':>10} {'p > 0.9':>8} {'classes':>13}"]
    for r in results:
        lines.append(f"{r['guidance']:>9g} {r['fid']:>8.2f} {r['conditional_accuracy']:>10.2%} "
                     f"{r['confident_fraction']:>8.1%} "
                     f"{100 * r['min_class_fraction']:>5.1f}-{100 * r['max_class_fraction']:.1f}%")
    return "\n".join(lines)


# ----- the command line -----
def evaluate_npz(args, config: Config | None, out_dir: Path, progress: bool) -> None:
    """--evaluate-npz: score a file of samples against MNIST or the checkpoint's dataset."""
    config = config or Config(DEVICE="cpu")
    samples, labels = load_samples(args.evaluate_npz, len(config.class_names) or None)
    result = make_evaluator_factory(args, progress)(config).evaluate(samples, labels=labels)
    result["source"] = str(args.evaluate_npz)
    print(format_report(result, f"{args.evaluate_npz}:"))
    path = save_json(result, unused(out_dir / f"eval_{Path(args.evaluate_npz).stem}.json"))
    print(f"metrics written to {path}")


def make_evaluator_factory(args, progress: bool):
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", "cpu")

    @functools.cache
    def evaluator_for(config: Config) -> Evaluator:  # built once: it embeds the whole test set
        dataset = open_dataset(config.DATASET, overrides.get("DATA_DIR") or config.DATA_DIR or None,
                               overrides.get("DOWNLOAD", config.DOWNLOAD), config.CHANNELS,
                               config.IMAGE_SIZE)
        return Evaluator(dataset, device=device, progress=progress)
    return evaluator_for


def choose_checkpoint(args) -> str:
    """--checkpoint, else the newest run's, else the pretrained model (said in one line)."""
    if args.checkpoint:
        return args.checkpoint
    newest = dist.broadcast_object(newest_checkpoint())
    if newest is not None:
        print(f"newest run: {newest}")
        return str(newest)
    if pretrained.available():
        print("no runs yet: drawing from the pretrained model that ships with the repo "
              "(python main.py trains your own in 15 minutes)")
        return pretrained.NAME
    raise ConfigError("no checkpoint found in runs/: train one with python main.py, or name "
                      "one with --checkpoint")


def run(args) -> int:
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", Config().DEVICE)
    out_dir = Path(overrides.get("OUTPUT_DIR") or DEFAULT_OUTPUT.parent)
    if overrides.get("THREADS"):  # e.g. two evaluations side by side, one thread each
        torch.set_num_threads(overrides["THREADS"])
    if dist.launched():  # torchrun: the samples are split between the processes
        dist.init(device)
        device = dist.local_device(device)
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")
    check_device(device)
    progress = not args.quiet and dist.is_main()
    jobs = [] if args.evaluate_npz and not args.checkpoint else \
        [job for job in JOBS if job.wanted(args)]
    paths = picture_paths(args, jobs) if jobs else {}
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
    refuse_without_classes(args, model.config)
    ctx = Context(args, model, out_dir, overrides.get("DATA_DIR"),
                  overrides.get("DOWNLOAD", True), progress, paths,
                  make_evaluator_factory(args, progress))
    describe(ctx)
    written = []
    for job in jobs:
        if dist.is_main() or job.name == "grid":  # only the grid's draw is split
            written += job.run(ctx)
    if ctx.results:  # the editing jobs' scores, printed above
        name = f"eval_{Path(str(args.checkpoint)).stem}_editing_n{args.inputs}.json"
        written.append(save_json({"checkpoint": str(args.checkpoint), "seed": args.seed,
                                  **ctx.results}, unused(out_dir / name)))
    for path in written:
        print(f"wrote {path}")
    if args.show and written:
        show(written[0])
    return 0


def describe(ctx: Context) -> None:
    """One line on the checkpoint and how it samples."""
    config, settings = ctx.config, ctx.settings(ctx.guidances[0])
    print(f"checkpoint {ctx.args.checkpoint}: {config.MODEL_CHANNELS}-channel UNet on "
          f"{config.DATASET}, {config.TIMESTEPS} timesteps ({config.SCHEDULE_TYPE}); sampling "
          f"with {settings.label} on {ctx.model.scheduler.betas.device} ({settings.precision})"
          + (", raw weights" if ctx.args.raw_weights else "")
          + (f"; classes {format_classes(config, ctx.classes)}, guidance "
             f"{', '.join(f'{w:g}' for w in ctx.guidances)} (eps_u + W (eps_c - eps_u))"
             + (f", rescaled {ctx.args.guidance_rescale:g}" if ctx.args.guidance_rescale else "")
             if ctx.classes else ""))


def classes_asked(args) -> list[str]:
    """The flags given that need a class-conditional checkpoint."""
    return [flag for flag, given in (("--digit", args.digit), ("--guidance", args.guidance),
                                     ("--guidance-rescale", args.guidance_rescale),
                                     ("--interpolate-digits", args.interpolate_digits)) if given]


def refuse_without_classes(args, config: Config) -> None:
    asked = classes_asked(args)
    if asked and not config.CONDITIONAL:
        raise ConfigError(f"{asked[0]} needs a class-conditional checkpoint; {args.checkpoint} "
                          f"was trained without --conditional and draws random images only "
                          f"(train one with: python main.py --conditional, the CPU preset's "
                          f"default)")


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
        dist.shutdown()


if __name__ == "__main__":
    dist.exit_process(main())
