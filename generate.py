"""Sample, evaluate and interpolate digits from a checkpoint (the model is rebuilt from it).

    python generate.py                                                  # the newest run in runs/
    python generate.py --checkpoint runs/NAME/latest.pt                 # a grid of digits
    python generate.py --checkpoint ckpt.pt --save-npz outputs/samples.npz
    python generate.py --checkpoint ckpt.pt --evaluate                  # FID etc. on 10,000
    python generate.py --evaluate-npz samples.npz                       # any source's samples
    python generate.py --checkpoint ckpt.pt --interpolate --num-steps 10
    python generate.py --checkpoint ckpt.pt --interpolate-real 0 1      # between test digits
    python generate.py --checkpoint ckpt.pt --chain                     # the reverse process
    python generate.py --checkpoint cond.pt --digit 7                   # only 7s (--conditional)
    python generate.py --checkpoint cond.pt --digit 0-9 --guidance 0 1 2 4 8   # guidance strip
    python generate.py --checkpoint cond.pt --interpolate-digits 3 8    # a 3 turning into an 8

Pictures go to outputs/ under names that are never reused (samples.png, samples-2.png, ...)
unless --output names the file. From Python (see README, "Use it from Python"):

    from generate import load_model, generate_images, generate_interpolation
    model = load_model("runs/NAME/latest.pt", "cpu")
    images = generate_images(model, 20, "cpu", save_path="grid.png")  # a conditional model: 0-9
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

from config import (Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides)

EVAL_DEFAULT_SAMPLES = 10_000
DEFAULT_OUTPUT = Path("outputs") / "samples.png"
GUIDANCE_HELP = ("classifier-free guidance scale W of a --conditional checkpoint: eps = eps_uncond "
                 "+ W (eps_cond - eps_uncond); 0 = unconditional, 1 = plain conditional, > 1 = "
                 "guided. TeaPearce's w is W - 1 (his (1+w) eps_c - w eps_u); lucidrains' and "
                 "diffusers' guidance scale is W itself. Several values: one guidance strip "
                 "(columns) or one --evaluate each (default: the checkpoint's setting)")


def parse_digits(tokens: list[str]) -> list[int]:
    """['7'] -> [7]; ['0-9'] -> [0, ..., 9]; ['1', '4', '9'] -> [1, 4, 9]. ValueError names
    the token that is not a digit 0-9 or a range of them."""
    digits = []
    for token in tokens:
        low, dash, high = token.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(f"--digit {token}: expected a digit 0-9, a range such as 0-9, "
                             f"or a list such as 1 4 9") from None
        if not (0 <= first <= 9 and 0 <= last <= 9):
            raise ValueError(f"--digit {token}: digits run from 0 to 9")
        if first > last:
            raise ValueError(f"--digit {token}: a range goes up, e.g. {last}-{first}")
        digits += range(first, last + 1)
    return digits


def digit_labels(digits: list[int], count: int):
    """The class of each of `count` images: image i draws digits[i mod len(digits)]."""
    import torch

    return torch.tensor(digits, dtype=torch.long).repeat(-(-count // len(digits)))[:count]


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="generate.py",
                              description="Generate MNIST digits from a checkpoint (README.md).")
    p.add_argument("--checkpoint", help="checkpoint written by main.py (default: latest.pt of "
                                        "the newest run in runs/)")
    p.add_argument("--output", help="PNG path of the picture; with several pictures, the grid's, "
                                    "the others beside it (default: outputs/samples.png, or "
                                    "samples-2.png etc. if taken: nothing is overwritten)")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help=f"digits to draw (default: 64, or 10 of each of several --digit, 0-9 "
                        f"for a conditional checkpoint; {EVAL_DEFAULT_SAMPLES} with --evaluate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise; image i depends only "
                                                        "on (seed, i) and its digit (default: 0)")
    p.add_argument("--batch-size", type=int, default=500, metavar="N",
                   help="images per network call; changes speed, not the images (default: 500)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="network evaluations per digit (default: the checkpoint's setting; "
                        "ddpm always takes all timesteps)")
    add_config_arguments(p, names={"SAMPLER", "ETA", "SPACING", "DEVICE", "PRECISION", "DATA_DIR",
                                   "DOWNLOAD", "OUTPUT_DIR", "THREADS"},
                         default_note={**{name: "the checkpoint's setting"
                                          for name in ("SAMPLER", "ETA", "SPACING")},
                                       "PRECISION": "fp32; bf16 autocast is faster on GPUs",
                                       "OUTPUT_DIR": "outputs"},
                         help_text={
                             "SAMPLER": "sampler for grids, --evaluate and --chain "
                                        "(interpolation always decodes with DDIM, eta 0)",
                             "PRECISION": "sampling precision (auto = bf16 on CUDA)",
                             "OUTPUT_DIR": "where --evaluate writes its JSON"})
    p.add_argument("--digit", nargs="+", metavar="D",
                   help="draw only these digits (a --conditional checkpoint): 7, a range 0-9 or "
                        "a list 1 4 9; several digits make one row each (default: 0-9 for a "
                        "conditional checkpoint, random digits otherwise)")
    p.add_argument("--guidance", type=float, nargs="+", metavar="W", help=GUIDANCE_HELP)
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance rescaling of Lin et al. 2023 (0 = off, 0.7 in their paper); "
                        "see the README's guidance sweep before using it (default: 0)")
    p.add_argument("--raw-weights", action="store_true",
                   help="sample with the raw weights instead of their EMA (for comparison)")
    p.add_argument("--save-npz", metavar="PATH",
                   help="also save the digits as uint8 (N, 28, 28) under key 'samples' (and, "
                        "for a conditional checkpoint, the digit each was drawn for under "
                        "'labels')")
    p.add_argument("--evaluate", action="store_true",
                   help="score the samples (FID, coverage, confidence; for a conditional "
                        "checkpoint 1,000 of each digit and the share classified as the digit "
                        "asked for) against the MNIST test set; JSON goes to --output-dir")
    p.add_argument("--evaluate-npz", metavar="PATH",
                   help="score an existing .npz of digits (key 'samples', uint8 (N, 28, 28); "
                        "optional 'labels', the digits asked for, adds the conditional accuracy)")
    p.add_argument("--interpolate", action="store_true",
                   help="decode a spherical path between pairs of noise vectors (a "
                        "conditional checkpoint: row r keeps the r-th --digit, default 0-9)")
    p.add_argument("--interpolate-real", type=int, nargs=2, metavar=("I", "J"),
                   help="interpolate between MNIST test digits I and J, inverted to noise by DDIM "
                        "(a conditional checkpoint: with their labels)")
    p.add_argument("--interpolate-digits", type=int, nargs=2, metavar=("A", "B"),
                   help="a --conditional checkpoint's digit A turning into B at fixed noise "
                        "(the class embedding interpolated), one row per --pairs")
    p.add_argument("--num-steps", type=int, default=10, metavar="K",
                   help="images along each interpolation (default: 10)")
    p.add_argument("--pairs", type=int, default=6, help="interpolation rows (default: 6)")
    p.add_argument("--inversion-steps", type=int, default=100, metavar="N",
                   help="DDIM steps for inverting real digits (default: 100)")
    p.add_argument("--chain", action="store_true",
                   help="picture of the reverse process x_T -> x_0 (PNG grid and animated GIF)")
    p.add_argument("--forward", action="store_true",
                   help="picture of the forward (noising) process on test digits")
    p.add_argument("--show", action="store_true", help="open the grid in a window afterwards")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args, parser) -> None:
    for name in ("num_samples", "batch_size", "steps", "num_steps", "pairs", "inversion_steps"):
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
    if args.digit is not None:
        try:
            args.digit = parse_digits(args.digit)
        except ValueError as error:
            parser.error(str(error))
    for digit in args.interpolate_digits or ():
        if not 0 <= digit <= 9:
            parser.error(f"--interpolate-digits {digit}: digits run from 0 to 9")
    for w in args.guidance or ():
        if not 0 <= w < float("inf"):
            parser.error(f"--guidance must be a finite number >= 0 (0 = unconditional, "
                         f"1 = plain conditional, > 1 = guided), got {w:g}")
    if not 0 <= args.guidance_rescale <= 1:
        parser.error(f"--guidance-rescale must lie in [0, 1], got {args.guidance_rescale:g}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", Config().DEVICE)
    out_dir = Path(overrides.get("OUTPUT_DIR") or DEFAULT_OUTPUT.parent)
    if overrides.get("THREADS"):  # e.g. two evaluations side by side, one thread each
        import torch

        torch.set_num_threads(overrides["THREADS"])
    from utils import distributed as dist
    from utils.checkpoint import CheckpointError
    from utils.classifier import ClassifierError
    from utils.data_loader import MNISTError

    if dist.launched():  # torchrun: the samples are split between the processes
        dist.init(device)
        device = dist.local_device(device)
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")
    try:
        check_device(device)
        if not args.checkpoint and not args.evaluate_npz:
            from utils.runs import newest_checkpoint

            args.checkpoint = dist.broadcast_object(newest_checkpoint())
            if args.checkpoint is None:
                raise ConfigError("no checkpoint found in runs/: train one with python main.py, "
                                  "or name one with --checkpoint")
            print(f"newest run: {args.checkpoint}")
        check_writable(Path(args.output).parent if args.output else DEFAULT_OUTPUT.parent,
                       "--output")
        check_writable(out_dir, "--output-dir")
        if args.save_npz:
            check_writable(Path(args.save_npz).parent, "--save-npz")
        return run(args, overrides, device, out_dir)
    except (ConfigError, CheckpointError, NpzError) as error:
        parser.exit(2, f"generate.py: error: {error}\n")
    except (MNISTError, ClassifierError) as error:
        parser.exit(1, f"generate.py: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "generate.py: interrupted (the files listed above as written are "
                         "complete)\n")
    finally:
        dist.shutdown()


class NpzError(ValueError):
    pass


def load_npz(path):
    """(samples uint8 (N, 28, 28), labels (N,) or None) from an .npz with 'samples' and,
    optionally, 'labels': the digit each sample was drawn for (conditional accuracy)."""
    import numpy as np
    import torch

    try:
        with np.load(path) as data:
            if "samples" not in data:
                raise NpzError(f"--evaluate-npz {path} has no 'samples' array "
                               f"(keys: {', '.join(data.files) or 'none'})")
            samples = data["samples"]
            labels = data["labels"] if "labels" in data else None
    except FileNotFoundError:
        raise NpzError(f"--evaluate-npz {path} does not exist") from None
    except (OSError, ValueError) as error:
        if isinstance(error, NpzError):
            raise
        raise NpzError(f"--evaluate-npz {path} is not a readable .npz (a zip of numpy arrays, "
                       f"as --save-npz writes)") from None
    if samples.dtype != np.uint8 or samples.ndim != 3 or samples.shape[1:] != (28, 28):
        raise NpzError(f"--evaluate-npz {path}: 'samples' must be uint8 (N, 28, 28), got "
                       f"{samples.dtype} {samples.shape}")
    if len(samples) == 0:
        raise NpzError(f"--evaluate-npz {path} holds no samples (N = 0); evaluation needs "
                       f"at least one")
    if labels is not None:
        if (labels.shape != (len(samples),) or not np.issubdtype(labels.dtype, np.integer)
                or labels.min() < 0 or labels.max() > 9):
            raise NpzError(f"--evaluate-npz {path}: 'labels' must be N = {len(samples)} "
                           f"integers 0-9 (the digit each sample was drawn for), got "
                           f"{labels.dtype} {labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(samples), labels


# ----- the functions to call from Python -----
def load_model(checkpoint_path, device=None, ema: bool = True):
    """The DiffusionModel of a checkpoint, in eval mode on `device` (default: CUDA if
    present), ready to sample; `model.config` is the Config it was trained with.
    ema=False loads the raw weights instead of their average. Raises
    utils.checkpoint.CheckpointError (one line) for a missing or bad file."""
    from models.diffusion import DiffusionModel

    device = device or Config().DEVICE
    model, config = DiffusionModel.from_checkpoint(checkpoint_path, device, ema=ema)
    model.config = config
    return model


def _sampling_settings(model, sampler, steps, eta) -> dict:
    config = getattr(model, "config", None) or Config()
    sampler = sampler or config.SAMPLER
    if steps is None:
        steps = model.timesteps if sampler == "ddpm" else min(config.SAMPLING_STEPS, model.timesteps)
    return dict(sampler=sampler, steps=steps, eta=config.ETA if eta is None else eta,
                spacing=config.SPACING)


def _check_conditional(model, what: str) -> None:
    if not model.conditional:
        raise ConfigError(f"{what} needs a class-conditional checkpoint; this one was trained "
                          f"without --conditional and draws random digits only (train one "
                          f"with: python main.py --conditional, the CPU preset's default)")


def _digits_or_all(model, digits: list[int] | None) -> list[int] | None:
    """The digits to draw: as asked (a conditional checkpoint only); if none were asked
    for, 0-9 for a conditional checkpoint (its "no class" branch alone draws poor digits)
    and None (random digits) for an unconditional one."""
    if digits:
        _check_conditional(model, "digits")
        return digits
    return list(range(10)) if model.conditional else None


def _guidance(model, guidance) -> float:
    config = getattr(model, "config", None) or Config()
    return config.GUIDANCE if guidance is None else guidance


def by_digit(images, digits: list[int] | None, limit: int | None = None):
    """The picture of images drawn with `digit_labels(digits, N)`: (images, row length).
    Several digits: one row per digit (at most `limit` images each). Otherwise the first
    limit^2 images in a square-ish grid at most 10 wide."""
    k = len(digits or ())
    if k <= 1:
        shown = images if limit is None else images[:limit ** 2]
        return shown, max(1, min(10, int(len(shown) ** 0.5)))
    per_digit = len(images) // k
    if per_digit == 0:
        return images, len(images)
    rows = images[:per_digit * k].reshape(per_digit, k, *images.shape[1:]).transpose(0, 1)
    rows = rows[:, :limit] if limit else rows
    return rows.flatten(0, 1), rows.shape[1]


def generate_images(model, num_samples: int, device=None, save_path=None,
                    show_images: bool = True, sampler: str | None = None,
                    steps: int | None = None, eta: float | None = None, seed: int = 0,
                    batch_size: int = 500, precision: str = "fp32", progress: bool = True,
                    digits: list[int] | None = None, guidance: float | None = None,
                    guidance_rescale: float = 0.0):
    """Draw `num_samples` digits: a (N, 1, 28, 28) tensor in [-1, 1], on the CPU.

    Sampler, steps and eta default to the checkpoint's settings; image i depends only on
    (seed, i) (and on its digit). digits (a conditional checkpoint; default 0-9 there):
    image i draws digits[i mod len(digits)], with classifier-free guidance of scale
    `guidance` (default: the checkpoint's); the PNG then has one row per digit. save_path
    writes a PNG grid; show_images draws the grid where a display exists (a notebook, a
    desktop) and does nothing on a headless machine."""
    from utils.visualization import display_available, plot_images, save_images

    if device is not None:
        model = model.to(device)
    labels = None
    digits = _digits_or_all(model, digits)
    if digits:
        labels = digit_labels(digits, num_samples)
    images = model.generate(num_samples, batch_size=batch_size, progress=progress, seed=seed,
                            precision=precision, labels=labels,
                            guidance=_guidance(model, guidance), guidance_rescale=guidance_rescale,
                            **_sampling_settings(model, sampler, steps, eta)).cpu()
    shown, nrow = by_digit(images, digits)
    if save_path is not None:
        save_images(shown, save_path, nrow=nrow)
    if show_images and display_available():
        plot_images(shown, f"{num_samples} samples", nrow=nrow, show=True)
    return images


def generate_class_interpolation(model, first: int, last: int, num_steps: int = 10,
                                 device=None, save_path=None, pairs: int = 1, seed: int = 0,
                                 guidance: float | None = None, steps: int | None = None,
                                 precision: str = "fp32", sampler: str | None = None,
                                 spacing: str | None = None, guidance_rescale: float = 0.0):
    """Digit `first` turning into digit `last` at fixed noise (a conditional checkpoint):
    column k is sampled with the class embedding (1 - a) e_first + a e_last, a = k/(K-1),
    deterministically (`sampler`, default the checkpoint's, with eta 0; DPM-Solver++ for
    ddpm), with classifier-free guidance `guidance` (default: the checkpoint's). Returns
    (pairs, num_steps, 1, 28, 28) in [-1, 1] on the CPU; row r uses the noise of image r
    under `seed`."""
    import torch

    from models.interpolation import class_weights
    from utils.visualization import save_images

    _check_conditional(model, "interpolating between digits")
    if device is not None:
        model = model.to(device)
    settings = _sampling_settings(model, sampler, steps, 0.0)
    if settings["sampler"] == "ddpm":  # ddpm is stochastic: its deterministic stand-in
        settings.update(sampler="dpm-solver", steps=steps or min(20, model.timesteps))
    if spacing:
        settings["spacing"] = spacing
    device = model.scheduler.betas.device
    e_first, e_last = (class_weights(model, torch.full((pairs,), digit, device=device))
                       for digit in (first, last))
    columns = []
    for a in torch.linspace(0, 1, num_steps).tolist():
        weights = (1 - a) * e_first + a * e_last
        columns.append(model.sample((pairs, *model.image_shape), seed=seed, labels=weights,
                                    guidance=_guidance(model, guidance), precision=precision,
                                    guidance_rescale=guidance_rescale,
                                    **settings).cpu())
    images = torch.stack(columns, dim=1)
    if save_path is not None:
        save_images(images.flatten(0, 1), save_path, nrow=num_steps)
    return images


def generate_interpolation(model, num_steps: int = 10, device=None, save_path=None,
                           pairs: int = 1, seed: int = 0, steps: int | None = None,
                           precision: str = "fp32", show_images: bool = False,
                           digits: list[int] | None = None, guidance: float | None = None,
                           guidance_rescale: float = 0.0):
    """Decode a spherical path between `pairs` pairs of noise vectors (deterministic DDIM):
    a (pairs, num_steps, 1, 28, 28) tensor in [-1, 1], on the CPU; one row per pair in
    the PNG at save_path. A conditional checkpoint keeps one digit along each row: row r
    draws digits[r mod len(digits)] (default 0-9) with guidance `guidance` (default: the
    checkpoint's)."""
    from models.interpolation import interpolation_path
    from utils.seeding import PerSampleNoise
    from utils.visualization import display_available, plot_images, save_images

    if device is not None:
        model = model.to(device)
    steps = steps or _sampling_settings(model, "ddim", None, 0.0)["steps"]
    noise = PerSampleNoise(seed, range(2 * pairs), model.image_shape,
                           model.scheduler.betas.device).initial()
    digits = _digits_or_all(model, digits)
    labels = digit_labels(digits, pairs).to(noise.device) if digits else None
    images = interpolation_path(model, noise[0::2], noise[1::2], num_steps, steps, precision,
                                labels=labels, guidance=_guidance(model, guidance),
                                guidance_rescale=guidance_rescale).cpu()
    if save_path is not None:
        save_images(images.flatten(0, 1), save_path, nrow=num_steps)
    if show_images and display_available():
        plot_images(images.flatten(0, 1), "interpolation", nrow=num_steps, show=True)
    return images


# ----- the command line -----
def picture_paths(args) -> dict[str, Path]:
    """Where each requested picture goes. One picture asked for: --output is its path.
    Several: --output is the grid's and the others take its name plus a suffix. No
    --output: outputs/samples*.png, numbered so that no existing file is overwritten."""
    strip = len(args.guidance or ()) > 1  # several guidance scales: a strip, not a grid
    special = (args.interpolate or args.interpolate_real or args.interpolate_digits
               or args.chain or args.forward or strip)
    kinds = [kind for kind, wanted in (
        ("grid", (not special or args.save_npz or args.evaluate) and not strip),
        ("guidance", strip),
        ("interpolation", args.interpolate), ("interpolation_real", args.interpolate_real),
        ("interpolation_digits", args.interpolate_digits),
        ("chain", args.chain), ("forward", args.forward)) if wanted]

    def named(base: Path) -> dict[str, Path]:
        if len(kinds) == 1 and args.output:
            paths = {kinds[0]: base}
        else:
            suffix = {"grid": "", "interpolation": "_interpolation", "chain": "_chain",
                      "forward": "_forward", "guidance": "_guidance",
                      "interpolation_real": "_interpolation_real_{}_{}".format(
                          *(args.interpolate_real or (0, 0))),
                      "interpolation_digits": "_digits_{}_to_{}".format(
                          *(args.interpolate_digits or (0, 0)))}
            paths = {kind: base.with_name(base.stem + suffix[kind] + ".png") for kind in kinds}
        if "chain" in paths:
            paths["chain_gif"] = paths["chain"].with_suffix(".gif")
        return paths

    if args.output:
        return named(Path(args.output))
    for k in range(1, 100_000):
        base = DEFAULT_OUTPUT if k == 1 else DEFAULT_OUTPUT.with_name(f"samples-{k}.png")
        paths = named(base)
        if not any(p.exists() for p in paths.values()):
            return paths
    raise ConfigError(f"{DEFAULT_OUTPUT.parent} holds too many pictures; name one with --output")


def unused(path: Path) -> Path:
    """`path`, or path-2, path-3, ... if it exists (for files the user did not name)."""
    k = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def run(args, overrides: dict, device: str, out_dir: Path) -> int:
    import torch

    from utils.data_loader import to_uint8
    from utils.metrics import Evaluator, format_report, save_json
    from utils.visualization import save_images, show
    from utils import distributed as dist
    from utils.trainer import resolve_precision

    progress = not args.quiet and dist.is_main()
    paths = picture_paths(args)
    sweep = args.evaluate and len(args.guidance or ()) > 1  # one evaluation per guidance
    if not dist.is_main() and "grid" not in paths and not sweep:
        return 0  # only the sample grid's and the evaluations' digits are split
    data_dir = overrides.get("DATA_DIR", Config.DATA_DIR)
    download = overrides.get("DOWNLOAD", Config.DOWNLOAD)

    @functools.cache
    def evaluator():  # built once, on first use: it embeds the whole test set
        return Evaluator(data_dir, device=device, progress=progress, download=download)

    def test_digits():
        from utils.data_loader import load_mnist

        return load_mnist(data_dir, train=False, download=download)  # (images, labels)

    if args.evaluate_npz and dist.is_main():
        samples, labels = load_npz(args.evaluate_npz)
        result = evaluator().evaluate(samples, labels=labels)
        result["source"] = str(args.evaluate_npz)
        path = save_json(result, unused(out_dir / f"eval_{Path(args.evaluate_npz).stem}.json"))
        print(format_report(result, f"{args.evaluate_npz}:"))
        print(f"metrics written to {path}")

    if not args.checkpoint:  # only --evaluate-npz
        return 0

    model = load_model(args.checkpoint, device, ema=not args.raw_weights)
    config = model.config  # the checkpoint's settings, the functions' defaults
    sampler = overrides.get("SAMPLER", config.SAMPLER)
    eta = overrides.get("ETA", config.ETA)
    precision = resolve_precision(overrides.get("PRECISION", "fp32"), device)
    steps = args.steps or (config.TIMESTEPS if sampler == "ddpm" else config.SAMPLING_STEPS)
    if steps > config.TIMESTEPS:
        raise ConfigError(f"--steps {steps} exceeds the checkpoint's {config.TIMESTEPS} timesteps")
    if sampler == "ddpm" and steps != config.TIMESTEPS:
        raise ConfigError(f"--sampler ddpm always takes all {config.TIMESTEPS} steps; for "
                          f"--steps {steps} use --sampler ddim --eta 1 (the same sampler, respaced)")
    spacing = overrides.get("SPACING", config.SPACING)
    sample_kwargs = dict(sampler=sampler, steps=steps, eta=eta, seed=args.seed,
                         precision=precision, spacing=spacing)
    label = (f"{sampler}-{steps}" + (f"-eta{eta:g}" if sampler != "ddpm" and eta else "")
             + (f"-{spacing}" if spacing != "auto" and sampler != "ddpm" else ""))
    print(f"checkpoint {args.checkpoint}: {config.MODEL_CHANNELS}-channel UNet, "
          f"{config.TIMESTEPS} timesteps ({config.SCHEDULE_TYPE}); sampling with {label} on "
          f"{device} ({precision}){', raw weights' if args.raw_weights else ''}")
    written = []

    digits, guidances = args.digit, args.guidance or [config.GUIDANCE]
    asked = [flag for flag, given in (("--digit", digits), ("--guidance", args.guidance),
                                      ("--guidance-rescale", args.guidance_rescale),
                                      ("--interpolate-digits", args.interpolate_digits)) if given]
    if asked:
        what = asked[0]
        if not config.CONDITIONAL:
            raise ConfigError(f"{what} needs a class-conditional checkpoint; {args.checkpoint} "
                              f"was trained without --conditional and draws random digits only "
                              f"(train one with: python main.py --conditional, the CPU "
                              f"preset's default)")
    if config.CONDITIONAL:
        digits = digits or list(range(10))
    if config.CONDITIONAL and ({"grid", "guidance", "chain"} & set(paths) or sweep):
        print(f"class-conditional: digits {format_digits(digits)}, guidance "
              f"{', '.join(f'{w:g}' for w in guidances)} (eps_u + W (eps_c - eps_u))"
              + (f", rescaled {args.guidance_rescale:g}" if args.guidance_rescale else ""))
    if args.save_npz and len(guidances) > 1:
        raise ConfigError("--save-npz takes one --guidance value")

    def draw(count: int, guidance: float):
        """Images 0 .. count-1 (this process's share under torchrun), on rank 0."""
        part = dist.local_slice(count)
        labels = digit_labels(digits, count)[part] if digits else None
        images = model.generate(part.stop - part.start, first_index=part.start,
                                batch_size=args.batch_size, progress=progress, labels=labels,
                                guidance=guidance, guidance_rescale=args.guidance_rescale,
                                **sample_kwargs).cpu()
        return dist.gather_to_rank0(images)

    def score(images, seconds: float, guidance: float) -> dict:
        labels = digit_labels(digits, len(images)) if digits else None
        result = evaluator().evaluate(images, labels=labels)
        result.update(checkpoint=str(args.checkpoint), sampler=label, seed=args.seed,
                      sampling_seconds=seconds, device=device, sampling_precision=precision,
                      raw_weights=args.raw_weights)
        name = f"eval_{Path(args.checkpoint).stem}_{label}"
        if digits:
            result.update(guidance=guidance, guidance_rescale=args.guidance_rescale,
                          digits=digits)
            name += f"_w{guidance:g}" + (f"_rescale{args.guidance_rescale:g}"
                                         if args.guidance_rescale else "")
        name += f"{'_raw' if args.raw_weights else ''}_n{len(images)}.json"
        written.append(save_json(result, unused(out_dir / name)))
        print(format_report(result, f"{args.checkpoint} ({label}):"))
        return result

    if "grid" in paths or sweep:
        default = EVAL_DEFAULT_SAMPLES if args.evaluate else (10 * len(digits) if digits and
                                                              len(digits) > 1 else 64)
        count = args.num_samples or default
        results = []
        for guidance in guidances:
            start = time.perf_counter()
            images = draw(count, guidance)
            seconds = time.perf_counter() - start
            if not dist.is_main():
                continue  # rank 0 writes and scores
            print(f"sampled {count} digits in {seconds:.1f} s ({count / seconds:.3g} images/s)"
                  + (f" at guidance {guidance:g}" if digits else ""))
            if "grid" in paths:
                shown, nrow = by_digit(images, digits, limit=10)
                written.append(save_images(shown, paths["grid"], nrow=nrow))
            if args.save_npz:
                import numpy as np

                npz = Path(args.save_npz)
                npz.parent.mkdir(parents=True, exist_ok=True)
                arrays = dict(samples=to_uint8(images.cpu()).numpy())
                if digits:
                    arrays["labels"] = digit_labels(digits, count).numpy().astype(np.uint8)
                np.savez_compressed(npz, **arrays)
                written.append(npz)
            if args.evaluate:
                results.append(score(images, seconds, guidance))
        if not dist.is_main():
            return 0  # every other picture is rank 0's
        if len(results) > 1:
            print(format_sweep(results))
    elif not dist.is_main():
        return 0

    if "guidance" in paths:
        written.append(guidance_strip(model, digits, guidances, args, sample_kwargs,
                                      paths["guidance"]))
    if args.interpolate_digits:
        written.append(paths["interpolation_digits"])
        generate_class_interpolation(model, *args.interpolate_digits, args.num_steps,
                                     save_path=paths["interpolation_digits"], pairs=args.pairs,
                                     seed=args.seed, guidance=guidances[0],
                                     steps=args.steps, precision=precision, sampler=sampler,
                                     spacing=spacing, guidance_rescale=args.guidance_rescale)
    if args.interpolate or args.interpolate_real:
        written += interpolate(args, model, steps if sampler != "ddpm" else 50, precision,
                               paths, test_digits, digits, guidances[0])
    if args.chain:
        conditioned = (dict(labels=digit_labels(digits, min(args.num_samples or 8, 16)),
                            guidance=guidances[0], guidance_rescale=args.guidance_rescale)
                       if digits else {})
        written += chain(args, model, {**sample_kwargs, **conditioned}, paths["chain"],
                         paths["chain_gif"])
    if args.forward:
        from utils.data_loader import normalize_images
        from utils.visualization import visualize_diffusion_process

        x0 = normalize_images(test_digits()[0][:8]).unsqueeze(1)
        path = paths["forward"]
        steps_shown = [min(round(f * config.TIMESTEPS), config.TIMESTEPS - 1) for f in
                       (0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]
        visualize_diffusion_process(model, x0, steps_shown, save_path=path)
        written.append(path)

    for path in written:
        print(f"wrote {path}")
    if args.show and written:
        show(written[0])
    return 0


def format_digits(digits: list[int]) -> str:
    return "0-9" if digits == list(range(10)) else " ".join(map(str, digits))


def format_sweep(results: list[dict]) -> str:
    """One line per guidance scale: the table the README's guidance sweep shows."""
    lines = [f"{'guidance':>9} {'FID':>8} {'asked-for':>10} {'p > 0.9':>8} {'classes':>13}"]
    for r in results:
        lines.append(f"{r['guidance']:>9g} {r['fid']:>8.2f} {r['conditional_accuracy']:>10.2%} "
                     f"{r['confident_fraction']:>8.1%} "
                     f"{100 * r['min_class_fraction']:>5.1f}-{100 * r['max_class_fraction']:.1f}%")
    return "\n".join(lines)


def guidance_strip(model, digits: list[int], guidances: list[float], args, sample_kwargs: dict,
                   path: Path) -> Path:
    """What guidance does: row r draws digit digits[r] from the noise of image r, once per
    guidance scale (the columns); a digit listed twice gets two rows of different noise."""
    import torch

    from utils.visualization import save_labelled_grid

    labels = torch.tensor(digits)
    columns = [model.sample((len(digits), *model.image_shape), labels=labels, guidance=w,
                            guidance_rescale=args.guidance_rescale, **sample_kwargs).cpu()
               for w in guidances]
    images = torch.stack(columns, dim=1).flatten(0, 1)
    return save_labelled_grid(images, path, len(guidances), [f"W={w:g}" for w in guidances],
                              "classifier-free guidance: eps_u + W (eps_c - eps_u)",
                              row_labels=[str(d) for d in digits])


def interpolate(args, model, steps, precision, paths, test_digits, digits,
                guidance) -> list[Path]:
    """Slerp between noise vectors (--interpolate) and between inverted test digits.
    A conditional checkpoint: rows of `digits` at `guidance` for --interpolate; test
    digits are inverted and decoded with their own labels (unguided, so that the ends
    are reconstructed), the class moving from one to the other along the path."""
    import torch

    from models.interpolation import interpolation_path, invert
    from utils.visualization import save_images

    written = []
    if args.interpolate:
        generate_interpolation(model, args.num_steps, save_path=paths["interpolation"],
                               pairs=args.pairs, seed=args.seed, steps=steps, precision=precision,
                               digits=digits, guidance=guidance,
                               guidance_rescale=args.guidance_rescale)
        written.append(paths["interpolation"])
    if args.interpolate_real:
        from utils.data_loader import normalize_images

        test_images, test_labels = test_digits()
        i, j = args.interpolate_real
        for index in (i, j):
            if not 0 <= index < len(test_images):
                raise ConfigError(f"--interpolate-real {index}: test-set indices run from 0 to "
                                  f"{len(test_images) - 1}")
        device = model.scheduler.betas.device
        real = normalize_images(test_images[[i, j]]).unsqueeze(1).to(device)
        labels = test_labels[[i, j]].long().to(device) if model.conditional else None
        latents = invert(model, real, args.inversion_steps, precision, labels)
        ends = None if labels is None else (labels[:1], labels[1:])
        images = interpolation_path(model, latents[:1], latents[1:], args.num_steps,
                                    args.inversion_steps, precision, clip_x0=False,
                                    labels=ends)[0]
        strip = torch.cat([real[:1], images, real[1:]])
        path = paths["interpolation_real"]
        written.append(save_images(strip, path, nrow=len(strip)))
        print(f"real digits {i} and {j} at both ends; reconstruction error of the inversion: "
              f"{(images[[0, -1]] - real).abs().mean().item():.4f} (mean |pixel| in [-1, 1])")
    return written


def chain(args, model, sample_kwargs, png_path, gif_path, columns: int = 11,
          gif_frames: int = 60) -> list[Path]:
    """x_t along the reverse process for a few samples: a PNG grid and an animated GIF."""
    from utils.seeding import PerSampleNoise
    from utils.visualization import save_chain, save_gif

    count = min(args.num_samples or 8, 16)
    states = []
    model.sample((count, *model.image_shape), first_index=0, progress=not args.quiet,
                 callback=lambda i, t, x, x0: states.append((t, x.clamp(-1, 1).cpu())),
                 **sample_kwargs)
    x_T = PerSampleNoise(sample_kwargs["seed"], range(count), model.image_shape, "cpu").initial()
    frames = [x_T] + [x for _, x in states]
    levels = [t for t, _ in states]  # the state after the step at levels[k] is at levels[k + 1]
    labels = ["x_T"] + [f"t={t}" for t in levels[1:]] + ["x_0"]
    pick = sorted({round(k * (len(frames) - 1) / (columns - 1)) for k in range(columns)})
    title = (f"reverse process, {sample_kwargs['sampler']} with {len(states)} steps: "
             f"x_T (noise) -> x_0")
    png = save_chain([frames[k] for k in pick], png_path,
                     [labels[k] for k in pick], title)
    every = max(1, len(frames) // gif_frames)
    gif_list = frames[::every] + ([frames[-1]] if (len(frames) - 1) % every else [])
    gif = save_gif(gif_list, gif_path,
                   nrow=min(count, 8))
    return [png, gif]


if __name__ == "__main__":
    from utils.distributed import exit_process

    exit_process(main())
