"""The jobs of generate.py: each one function that draws, scores or pictures, names its
own outputs, and returns the paths it wrote.

`JOBS` is the one list of what generate.py can do: a job says when it is wanted (from
the command line's flags), the suffix of its picture's name and the function that does
it. Each function takes a `Context` (the request, the loaded model, the output folder)
and calls the Python API (sampling/api.py) for the work itself, so that a notebook can
do the same with one call: `generate_images`, `guidance_strip`, `generate_interpolation`,
`interpolate_real`, `generate_class_interpolation`, `chain`, `forward_process`,
`inpaint_images`, `edit_images`; the scores are `evaluate_draw`, `score_inpainting` and
`score_edits` here.
"""
from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from config import Config, ConfigError, check_writable, config_overrides
from evaluation.classifier import predict
from evaluation.metrics import Evaluator, format_report
from evaluation.npz import load_samples, recorded_dataset, write_samples
from sampling.api import (chain, dataset_of, draw, edit_images, forward_process, generate_class_interpolation,
                          generate_interpolation, guidance_strip, inpaint_images,
                          interpolate_real, save_grid, settings_for, test_images, test_set)
from sampling.editing import load_mask, make_mask
from utils.datasets.folder import read_image
from sampling.settings import (arrange, choose_classes, default_count, format_classes,
                               labels_for, row_labels, without_classes)
from sampling import pretrained
from utils import distributed as dist
from utils.data_loader import normalize_images, to_uint8
from utils.files import claim, save_json, unused
from utils.runs import newest_checkpoint
from utils.text import duration

EVAL_DEFAULT_SAMPLES = 10_000
DEFAULT_OUTPUT = Path("outputs") / "samples.png"


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

    @classmethod
    def of(cls, args, model, out_dir: Path, paths: dict, progress: bool) -> "Context":
        """The context of generate.py's request `args` (its parsed flags) for `model`."""
        given = config_overrides(args)
        return cls(args, model, out_dir, given.get("DATA_DIR"), given.get("DOWNLOAD", True),
                   progress, paths, make_evaluator_factory(args, progress))

    @functools.cached_property
    def config(self) -> Config:
        return self.model.config

    @functools.cached_property
    def classes(self) -> list[int] | None:
        return choose_classes(self.config, self.args.digit, self.args.class_flag)

    @functools.cached_property
    def guidances(self) -> list[float]:
        return self.args.guidance or [self.config.GUIDANCE]

    @property
    def guidances_text(self) -> str:
        return ", ".join(f"{w:g}" for w in self.guidances)

    @functools.cached_property
    def draws(self) -> list[tuple[float, float | None]]:
        """(guidance, autoguidance) of each draw of a sweep: every --guidance with every
        --autoguidance (None: the checkpoint's)."""
        return [(w, a) for w in self.guidances for a in (self.args.autoguidance or [None])]

    def draw_picture(self, autoguidance: float) -> Path:
        """Where a draw's grid goes: the grid's path when there is one draw; with several
        --autoguidance values, one picture each beside it, named by its value
        (samples_ag1.25.png), never overwriting a file. (Several --guidance values draw one
        strip instead of grids.)"""
        path = self.paths["grid"]
        if len(self.draws) == 1:
            return path
        return unused(path.with_name(f"{path.stem}_ag{autoguidance:g}{path.suffix}"))

    def settings(self, guidance: float | None = None, **changes):
        args, given = self.args, config_overrides(self.args)
        options = dict(sampler=given.get("SAMPLER"), steps=args.steps, eta=given.get("ETA"),
                       spacing=given.get("SPACING"), guidance=guidance,
                       guidance_rescale=args.guidance_rescale,
                       precision=given.get("PRECISION", "fp32"),
                       autoguidance=(args.autoguidance or [None])[0],
                       guidance_interval=args.guidance_interval)
        return settings_for(self.model, **{**options, **changes})

    def evaluator(self):
        return self.evaluator_factory(self.config)


def job_samples(ctx: Context) -> list[Path]:
    """The grid (and --save-npz, --evaluate): one draw per --guidance value."""
    args, written, results = ctx.args, [], []
    count = args.num_samples or default_count(ctx.classes)
    if args.evaluate:  # the data and the classifier before the long draw: fail fast
        real = ctx.evaluator().floor_size
        count = args.num_samples or min(EVAL_DEFAULT_SAMPLES, real)
        if count < EVAL_DEFAULT_SAMPLES and not args.num_samples:
            print(f"evaluating {count:,} samples: as many as the real images of the floor "
                  f"({real:,} {ctx.evaluator().floor_source}; FID depends on the count)")
        print(estimate_cost(ctx, count))
    for guidance, autoguidance in ctx.draws:
        settings = ctx.settings(guidance, autoguidance=autoguidance)
        start = time.perf_counter()
        images = draw(ctx.model, count, settings, ctx.classes, args.seed, args.batch_size,
                      ctx.progress)
        seconds = time.perf_counter() - start
        if not dist.is_main():
            continue  # rank 0 writes and scores
        print(f"sampled {count:,} images in {seconds:.1f} s ({count / seconds:.3g} images/s)"
              + (f" at guidance {guidance:g}" if ctx.classes else "")
              + (f", autoguidance {settings.autoguidance:g}" if settings.autoguidance != 1
                 else ""))
        if "grid" in ctx.paths:
            shown, nrow = arrange(images, ctx.classes)
            written.append(save_grid(shown, nrow, row_labels(ctx.config, ctx.classes),
                                     ctx.draw_picture(autoguidance)))
        labels = labels_for(ctx.classes, count)
        if args.save_npz:
            replaced = Path(args.save_npz).exists()
            written.append(write_samples(args.save_npz, to_uint8(images), labels, {
                "dataset": ctx.config.DATASET, "data_dir": ctx.config.DATA_DIR,
                "class_names": ctx.config.class_names}))
            if replaced:
                print(f"replaced {args.save_npz} (as --save-npz asked)")
        if args.evaluate:
            results.append(evaluate_images(ctx, images, labels, settings, seconds))
    if len(results) > 1:
        print(format_sweep(results))
    return written


def estimate_cost(ctx: Context, count: int, probe: int = 50) -> str:
    """What an evaluation will cost on this machine, from timing a draw of `probe` images
    with the settings of the first draw (plus the classifier's features, a small share)."""
    settings = ctx.settings(*ctx.draws[0][:1], autoguidance=ctx.draws[0][1])
    start = time.perf_counter()
    draw(ctx.model, min(probe, count), settings, ctx.classes, ctx.args.seed, probe, False)
    seconds = (time.perf_counter() - start) / min(probe, count) * count * len(ctx.draws)
    return (f"evaluation: {len(ctx.draws)} draw(s) of {count:,} samples with {settings.label} "
            f"({settings.network_evaluations(ctx.model.conditional)} network evaluations each): "
            f"about {duration(seconds)} on this machine")


def evaluate_images(ctx: Context, images, labels, settings, seconds: float) -> dict:
    """Score a draw, print the report, then write its JSON (results first: a full disk
    cannot hide them)."""
    args = ctx.args
    result = ctx.evaluator().evaluate(images, labels=labels)
    result.update(checkpoint=str(args.checkpoint), sampler=settings.label, seed=args.seed,
                  sampling_seconds=seconds, device=str(ctx.model.scheduler.betas.device),
                  sampling_precision=settings.precision, raw_weights=args.raw_weights,
                  dataset=ctx.config.DATASET, autoguidance=settings.autoguidance,
                  guidance_interval=settings.interval,
                  guide=(str(args.guide) if args.guide else "the checkpoint's snapshot")
                  if settings.autoguidance != 1 else None)
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
          f"{ctx.guidances_text}")
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
    images, labels, what = editing_inputs(ctx)
    steps = args.steps or ctx.config.SAMPLING_STEPS
    side = ctx.config.IMAGE_SIZE
    for name in args.mask:
        mask = load_mask(name, side) if name.lower().endswith(".png") else \
            make_mask(name, len(images), side, args.seed)
        path = ctx.paths.get("inpaint") or ctx.paths[f"inpaint_{Path(name).stem}"]
        print(f"inpainting {len(images)} {what}, mask {name}: RePaint, {steps} steps x "
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


def editing_inputs(ctx: Context):
    """What --inpaint and --edit work on: (uint8 images (N, C, H, W), their labels or None,
    a few words on what they are). --input: image files (read as a folder's images are:
    the model's channels, centre-cropped, resized) and test-set indices; files have no
    class, so labels are None if there is one. Otherwise the first --inputs test images."""
    tokens = ctx.args.input
    if not tokens:
        images, labels = test_set(ctx.model, ctx.data_dir, ctx.download)
        if ctx.args.inputs > len(images):
            raise ConfigError(f"--inputs {ctx.args.inputs}: the test set has {len(images):,} images")
        return images[:ctx.args.inputs], labels[:ctx.args.inputs], "test images"
    for token in tokens:
        if not token.isdigit() and not Path(token).is_file():
            raise ConfigError(f"--input {token}: no such file (an image file, or a test-set "
                              f"index)")
    indices = [int(t) for t in tokens if t.isdigit()]
    tests = test_images(ctx.model, indices, ctx.data_dir, ctx.download, what="--input") \
        if indices else None
    pictures, labels, k = [], [], 0
    for token in tokens:
        if token.isdigit():
            pictures.append(tests[0][k])
            labels.append(int(tests[1][k]))
            k += 1
        else:
            pictures.append(torch.from_numpy(read_image(Path(token), ctx.config.CHANNELS,
                                                        ctx.config.IMAGE_SIZE).copy()))
            labels.append(None)
    if None in labels:
        return torch.stack(pictures), None, "images given"
    return torch.stack(pictures), torch.tensor(labels), "test images"


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
    images, labels, what = editing_inputs(ctx)
    if args.evaluate:
        ctx.evaluator()
    own = labels if ctx.config.CONDITIONAL and not args.digit else None
    settings = ctx.settings(ctx.guidances[0])
    print(f"SDEdit of {len(images)} {what} at strength {', '.join(f'{s:g}' for s in args.strength)}"
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


def right_class(ctx: Context, images, target) -> float | None:
    """The share of `images` the evaluation classifier reads as `target` (None: no target,
    e.g. files of no known class with no --digit to aim at)."""
    if target is None:
        return None
    _, probs = predict(ctx.evaluator().classifier, images)
    return float((probs.argmax(1) == target.cpu()).double().mean())


def format_editing(scores: list[dict], title: str) -> str:
    lines = [title]
    for s in scores:
        what = (f"  {s['method']} (x{s['resample']})" if "method" in s
                else f"  strength {s['strength']:g}")
        right = ("right class     -  (no class known: aim with --digit)"
                 if s["right_class"] is None else f"right class {100 * s['right_class']:5.1f}%")
        lines.append(f"{what:<40} {right}"
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


def picture_paths(args, jobs, folder: Path = DEFAULT_OUTPUT.parent) -> dict[str, Path]:
    """Where each job's picture goes. One picture asked for: --output is its path.
    Several: --output is the first's and the others take its name plus their suffix. No
    --output: folder/samples*.png (--output-dir; outputs/ by default), numbered so that no
    existing file is overwritten."""
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
            if job.name == "inpaint" and len(args.mask) > 1:  # a picture per mask
                del paths[job.name]
                paths.update({f"inpaint_{Path(m).stem}": path.with_name(
                    f"{path.stem}_{Path(m).stem}.png") for m in args.mask})
        return paths

    if args.output:
        return named(Path(args.output))
    check_writable(folder, "--output-dir")
    for k in range(1, 100_000):
        base = folder / (DEFAULT_OUTPUT.name if k == 1 else f"samples-{k}.png")
        paths = named(base)
        if claim(*paths.values()):  # all of them, atomically: no other process gets them
            return paths
    raise ConfigError(f"{folder} holds too many pictures; name one with --output")


def format_sweep(results: list[dict]) -> str:
    """One line per draw of a sweep over guidance and autoguidance."""
    lines = [f"{'guidance':>9} {'autoguid.':>9} {'FID':>8} {'asked-for':>10} {'p > 0.9':>8} "
             f"{'classes':>13}"]
    for r in results:
        asked = r.get("conditional_accuracy")
        lines.append(f"{r.get('guidance', 1):>9g} {r['autoguidance']:>9g} {r['fid']:>8.2f} "
                     f"{'' if asked is None else f'{asked:.2%}':>10} "
                     f"{r['confident_fraction']:>8.1%} "
                     f"{100 * r['min_class_fraction']:>5.1f}-{100 * r['max_class_fraction']:.1f}%")
    return "\n".join(lines)


# ----- the command line -----
def evaluate_npz(args, config: Config | None, out_dir: Path, progress: bool) -> None:
    """--evaluate-npz: score a file of samples against the checkpoint's dataset, else the
    one the file records (--save-npz writes it), else MNIST (said so)."""
    if config is None:
        config = npz_config(args.evaluate_npz)
    samples, labels = load_samples(args.evaluate_npz, len(config.class_names) or None)
    result = make_evaluator_factory(args, progress)(config).evaluate(samples, labels=labels)
    result["source"] = str(args.evaluate_npz)
    print(format_report(result, f"{args.evaluate_npz}:"))
    path = save_json(result, unused(out_dir / f"eval_{Path(args.evaluate_npz).stem}.json"))
    print(f"metrics written to {path}")


def npz_config(path) -> Config:
    """The dataset an .npz of samples records, as a Config to evaluate against (MNIST,
    with a note, for files that record none)."""
    recorded = recorded_dataset(path)
    samples, _ = load_samples(path, len(recorded["class_names"]) or None if recorded else None)
    if recorded is None:  # (a file that cannot be scored said why above)
        print(f"note: {path} does not say what its samples are of (older files, or other "
              f"code's): scored against MNIST; --checkpoint CKPT names the dataset")
        return Config(DEVICE="cpu")
    return Config(DATASET=recorded["dataset"], DATA_DIR=recorded["data_dir"],
                  CLASS_NAMES=recorded["class_names"], CHANNELS=samples.shape[1],
                  IMAGE_SIZE=samples.shape[-1], DEVICE="cpu")


def make_evaluator_factory(args, progress: bool):
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", "cpu")

    @functools.cache
    def evaluator_for(config: Config) -> Evaluator:  # built once: it embeds the whole test set
        dataset = dataset_of(config, overrides.get("DATA_DIR"),
                             overrides.get("DOWNLOAD", config.DOWNLOAD))
        return Evaluator(dataset, device=device, progress=progress)
    return evaluator_for



def describe(ctx: Context) -> None:
    """One line on the checkpoint and how it samples."""
    config, settings = ctx.config, ctx.settings(ctx.guidances[0])
    print(f"checkpoint {ctx.args.checkpoint}: {config.MODEL_CHANNELS}-channel UNet on "
          f"{config.DATASET}, {config.TIMESTEPS} timesteps ({config.SCHEDULE_TYPE}); sampling "
          f"with {settings.label} on {ctx.model.scheduler.betas.device} ({settings.precision})"
          + (", raw weights" if ctx.args.raw_weights else "")
          + (f"; classes {format_classes(config, ctx.classes)}, guidance "
             f"{ctx.guidances_text} (eps_u + W (eps_c - eps_u))"
             + (f", rescaled {ctx.args.guidance_rescale:g}" if ctx.args.guidance_rescale else "")
             if ctx.classes else "")
          + (f"; {config.CLUSTERS} clusters of its images as classes (--clusters), each drawn "
             f"in proportion to its size"
             + (f", guidance {ctx.guidances_text}" if ctx.guidances != [1.0] else "")
             if config.CLUSTERS else "")
          + _describe_autoguidance(ctx, settings))


def _describe_autoguidance(ctx: Context, settings) -> str:
    scales = ctx.args.autoguidance or [settings.autoguidance]
    if scales == [1]:
        return ""
    guide = ctx.args.guide or "the checkpoint's early snapshot"
    return (f"; autoguidance {', '.join(f'{a:g}' for a in scales)} (guide + A (model - guide), "
            f"guide: {guide})" + (f", guided where {settings.interval[0]:g} < sigma <= "
                                  f"{settings.interval[1]:g}" if settings.interval else ""))


def classes_asked(args) -> list[str]:
    """The flags given that need a class-conditional checkpoint."""
    return [flag for flag, given in (("--digit", args.digit), ("--guidance", args.guidance),
                                     ("--guidance-rescale", args.guidance_rescale),
                                     ("--interpolate-digits", args.interpolate_digits)) if given]


def refuse_without_classes(args, config: Config) -> None:
    """A flag that needs the dataset's classes, refused for a checkpoint without them
    (guidance acts on the clusters of one that learned them, --clusters)."""
    asked = [flag for flag in classes_asked(args)
             if not (config.CLUSTERS and flag in ("--guidance", "--guidance-rescale"))]
    if asked and not config.CONDITIONAL:
        raise ConfigError(without_classes(config, asked[0], str(args.checkpoint)))


def save_editing_scores(ctx: Context) -> list[Path]:
    """The editing jobs' scores (printed as they came) in one JSON, if there are any."""
    if not ctx.results:
        return []
    args = ctx.args
    name = f"eval_{Path(str(args.checkpoint)).stem}_editing_n{args.inputs}.json"
    return [save_json({"checkpoint": str(args.checkpoint), "seed": args.seed, **ctx.results},
                      unused(ctx.out_dir / name))]


def choose_checkpoint(args) -> str:
    """--checkpoint, else the newest run's (saying how to go back to the shipped model),
    else the pretrained model that ships with the repo (said in one line)."""
    if args.checkpoint:
        return args.checkpoint
    newest = dist.broadcast_object(newest_checkpoint())
    if newest is not None:
        print(f"drawing from the newest run, {newest}"
              + (" (the model that ships with the repo: --checkpoint pretrained)"
                 if pretrained.available() else ""))
        return str(newest)
    if pretrained.available():
        print("no runs yet: drawing from the pretrained model that ships with the repo "
              "(python main.py trains your own in 15 minutes)")
        return pretrained.NAME
    raise ConfigError("no checkpoint found in runs/: train one with python main.py, or name "
                      "one with --checkpoint")
