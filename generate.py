"""Sample, evaluate and interpolate digits from a checkpoint (the model is rebuilt from it).

    python generate.py                                                  # the newest run in runs/
    python generate.py --checkpoint runs/NAME/latest.pt                 # a grid of digits
    python generate.py --checkpoint ckpt.pt --save-npz outputs/samples.npz
    python generate.py --checkpoint ckpt.pt --evaluate                  # FID etc. on 10,000
    python generate.py --evaluate-npz samples.npz                       # any source's samples
    python generate.py --checkpoint ckpt.pt --interpolate --num-steps 10
    python generate.py --checkpoint ckpt.pt --interpolate-real 0 1      # between test digits
    python generate.py --checkpoint ckpt.pt --chain                     # the reverse process

Pictures go to outputs/ under names that are never reused (samples.png, samples-2.png, ...)
unless --output names the file. From Python (see README, "Use it from Python"):

    from generate import load_model, generate_images, generate_interpolation
    model = load_model("runs/NAME/latest.pt", "cpu")
    images = generate_images(model, 16, "cpu", save_path="grid.png")
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from config import (Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides)

EVAL_DEFAULT_SAMPLES = 10_000
DEFAULT_OUTPUT = Path("outputs") / "samples.png"


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="generate.py",
                              description="Generate MNIST digits from a checkpoint (README.md).")
    p.add_argument("--checkpoint", help="checkpoint written by main.py (default: latest.pt of "
                                        "the newest run in runs/)")
    p.add_argument("--output", help="PNG path of the picture; with several pictures, the grid's, "
                                    "the others beside it (default: outputs/samples.png, or "
                                    "samples-2.png etc. if taken: nothing is overwritten)")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help=f"digits to draw (default: 64; {EVAL_DEFAULT_SAMPLES} with --evaluate)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise; image i depends only "
                                                        "on (seed, i) (default: 0)")
    p.add_argument("--batch-size", type=int, default=500, metavar="N",
                   help="images per network call; changes speed, not the images (default: 500)")
    p.add_argument("--steps", type=int, metavar="N",
                   help="network evaluations per digit (default: the checkpoint's setting; "
                        "ddpm always takes all timesteps)")
    add_config_arguments(p, names={"SAMPLER", "ETA", "SPACING", "DEVICE", "PRECISION", "DATA_DIR",
                                   "DOWNLOAD", "OUTPUT_DIR"},
                         default_note={**{name: "the checkpoint's setting"
                                          for name in ("SAMPLER", "ETA", "SPACING")},
                                       "PRECISION": "fp32; bf16 autocast is faster on GPUs",
                                       "OUTPUT_DIR": "outputs"},
                         help_text={
                             "SAMPLER": "sampler for grids, --evaluate and --chain "
                                        "(interpolation always decodes with DDIM, eta 0)",
                             "PRECISION": "sampling precision (auto = bf16 on CUDA)",
                             "OUTPUT_DIR": "where --evaluate writes its JSON"})
    p.add_argument("--raw-weights", action="store_true",
                   help="sample with the raw weights instead of their EMA (for comparison)")
    p.add_argument("--save-npz", metavar="PATH",
                   help="also save the digits as uint8 (N, 28, 28) under key 'samples'")
    p.add_argument("--evaluate", action="store_true",
                   help="score the samples (FID, coverage, confidence) against the MNIST test "
                        "set; JSON goes to --output-dir")
    p.add_argument("--evaluate-npz", metavar="PATH",
                   help="score an existing .npz of digits (key 'samples', uint8 (N, 28, 28))")
    p.add_argument("--interpolate", action="store_true",
                   help="decode a spherical path between pairs of noise vectors")
    p.add_argument("--interpolate-real", type=int, nargs=2, metavar=("I", "J"),
                   help="interpolate between MNIST test digits I and J, inverted to noise by DDIM")
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
    if args.ETA is not None and args.ETA < 0:
        parser.error(f"--eta must be >= 0, got {args.ETA}")
    if args.output and Path(args.output).suffix.lower() != ".png":
        parser.error(f"--output must be a .png path, got {args.output}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", Config().DEVICE)
    out_dir = Path(overrides.get("OUTPUT_DIR") or DEFAULT_OUTPUT.parent)
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
        return run(args, overrides, device, out_dir)
    except (ConfigError, CheckpointError, NpzError) as error:
        parser.exit(2, f"generate.py: error: {error}\n")
    except (MNISTError, ClassifierError) as error:
        parser.exit(1, f"generate.py: error: {error}\n")
    finally:
        dist.shutdown()


class NpzError(ValueError):
    pass


def load_npz(path):
    import numpy as np
    import torch

    try:
        with np.load(path) as data:
            if "samples" not in data:
                raise NpzError(f"--evaluate-npz {path} has no 'samples' array "
                               f"(keys: {', '.join(data.files) or 'none'})")
            samples = data["samples"]
    except FileNotFoundError:
        raise NpzError(f"--evaluate-npz {path} does not exist") from None
    except (OSError, ValueError) as error:
        if isinstance(error, NpzError):
            raise
        raise NpzError(f"--evaluate-npz {path} is not a readable .npz ({error})") from None
    if samples.dtype != np.uint8 or samples.ndim != 3 or samples.shape[1:] != (28, 28):
        raise NpzError(f"--evaluate-npz {path}: 'samples' must be uint8 (N, 28, 28), got "
                       f"{samples.dtype} {samples.shape}")
    if len(samples) == 0:
        raise NpzError(f"--evaluate-npz {path} holds no samples (N = 0); evaluation needs "
                       f"at least one")
    return torch.from_numpy(samples)


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


def generate_images(model, num_samples: int, device=None, save_path=None,
                    show_images: bool = True, sampler: str | None = None,
                    steps: int | None = None, eta: float | None = None, seed: int = 0,
                    batch_size: int = 500, precision: str = "fp32", progress: bool = True):
    """Draw `num_samples` digits: a (N, 1, 28, 28) tensor in [-1, 1], on the CPU.

    Sampler, steps and eta default to the checkpoint's settings; image i depends only on
    (seed, i). save_path writes a PNG grid; show_images draws the grid where a display
    exists (a notebook, a desktop) and does nothing on a headless machine."""
    from utils.visualization import display_available, plot_images, save_images

    if device is not None:
        model = model.to(device)
    images = model.generate(num_samples, batch_size=batch_size, progress=progress, seed=seed,
                            precision=precision,
                            **_sampling_settings(model, sampler, steps, eta)).cpu()
    nrow = max(1, min(10, int(num_samples ** 0.5)))
    if save_path is not None:
        save_images(images, save_path, nrow=nrow)
    if show_images and display_available():
        plot_images(images, f"{num_samples} samples", nrow=nrow, show=True)
    return images


def generate_interpolation(model, num_steps: int = 10, device=None, save_path=None,
                           pairs: int = 1, seed: int = 0, steps: int | None = None,
                           precision: str = "fp32", show_images: bool = False):
    """Decode a spherical path between `pairs` pairs of noise vectors (deterministic DDIM):
    a (pairs, num_steps, 1, 28, 28) tensor in [-1, 1], on the CPU; one row per pair in
    the PNG at save_path."""
    from models.interpolation import interpolation_path
    from utils.seeding import PerSampleNoise
    from utils.visualization import display_available, plot_images, save_images

    if device is not None:
        model = model.to(device)
    steps = steps or _sampling_settings(model, "ddim", None, 0.0)["steps"]
    noise = PerSampleNoise(seed, range(2 * pairs), model.image_shape,
                           model.scheduler.betas.device).initial()
    images = interpolation_path(model, noise[0::2], noise[1::2], num_steps, steps,
                                precision).cpu()
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
    special = args.interpolate or args.interpolate_real or args.chain or args.forward
    kinds = [kind for kind, wanted in (
        ("grid", not special or args.save_npz or args.evaluate),
        ("interpolation", args.interpolate), ("interpolation_real", args.interpolate_real),
        ("chain", args.chain), ("forward", args.forward)) if wanted]

    def named(base: Path) -> dict[str, Path]:
        if len(kinds) == 1 and args.output:
            paths = {kinds[0]: base}
        else:
            suffix = {"grid": "", "interpolation": "_interpolation", "chain": "_chain",
                      "forward": "_forward", "interpolation_real": "_interpolation_real_{}_{}"}
            paths = {kind: base.with_name(base.stem + suffix[kind].format(
                *(args.interpolate_real or ())) + ".png") for kind in kinds}
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

    from models.diffusion import DiffusionModel
    from utils.data_loader import to_uint8
    from utils.metrics import Evaluator, format_report, save_json
    from utils.visualization import save_images, show
    from utils import distributed as dist
    from utils.trainer import resolve_precision

    progress = not args.quiet and dist.is_main()
    paths = picture_paths(args)
    if not dist.is_main() and "grid" not in paths:
        return 0  # only the sample grid's digits are split between processes
    data_dir = overrides.get("DATA_DIR", Config.DATA_DIR)
    download = overrides.get("DOWNLOAD", Config.DOWNLOAD)

    def evaluator():
        return Evaluator(data_dir, device=device, progress=progress, download=download)

    def test_digits():
        from utils.data_loader import load_mnist

        return load_mnist(data_dir, train=False, download=download)[0]

    if args.evaluate_npz and dist.is_main():
        samples = load_npz(args.evaluate_npz)
        result = evaluator().evaluate(samples)
        result["source"] = str(args.evaluate_npz)
        path = save_json(result, unused(out_dir / f"eval_{Path(args.evaluate_npz).stem}.json"))
        print(format_report(result, f"{args.evaluate_npz}:"))
        print(f"metrics written to {path}")

    if not args.checkpoint:  # only --evaluate-npz
        return 0

    model, config = DiffusionModel.from_checkpoint(args.checkpoint, device,
                                                   ema=not args.raw_weights)
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

    if "grid" in paths:
        count = args.num_samples or (EVAL_DEFAULT_SAMPLES if args.evaluate else 64)
        start = time.perf_counter()
        part = dist.local_slice(count)  # under torchrun each process draws its share
        images = model.generate(part.stop - part.start, first_index=part.start,
                                batch_size=args.batch_size, progress=progress,
                                **sample_kwargs).cpu()
        images = dist.gather_to_rank0(images)
        seconds = time.perf_counter() - start
        if not dist.is_main():
            return 0  # rank 0 writes and scores; every other picture is rank 0's too
        print(f"sampled {count} digits in {seconds:.1f} s ({count / seconds:.3g} images/s)")
        shown = images[:min(count, 100)]
        written.append(save_images(shown, paths["grid"], nrow=max(1, min(10, int(len(shown) ** 0.5)))))
        if args.save_npz:
            import numpy as np

            npz = Path(args.save_npz)
            npz.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(npz, samples=to_uint8(images.cpu()).numpy())
            written.append(npz)
        if args.evaluate:
            result = evaluator().evaluate(images)
            result.update(checkpoint=str(args.checkpoint), sampler=label, seed=args.seed,
                          sampling_seconds=seconds, device=device, sampling_precision=precision,
                          raw_weights=args.raw_weights)
            name = (f"eval_{Path(args.checkpoint).stem}_{label}"
                    f"{'_raw' if args.raw_weights else ''}_n{count}.json")
            written.append(save_json(result, unused(out_dir / name)))
            print(format_report(result, f"{args.checkpoint} ({label}):"))

    if args.interpolate or args.interpolate_real:
        written += interpolate(args, model, steps if sampler != "ddpm" else 50, precision,
                               paths, test_digits)
    if args.chain:
        written += chain(args, model, sample_kwargs, paths["chain"], paths["chain_gif"])
    if args.forward:
        from utils.data_loader import normalize_images
        from utils.visualization import visualize_diffusion_process

        x0 = normalize_images(test_digits()[:8]).unsqueeze(1)
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


def interpolate(args, model, steps, precision, paths, test_digits) -> list[Path]:
    """Slerp between noise vectors (--interpolate) and between inverted test digits."""
    import torch

    from models.interpolation import interpolation_path, invert
    from utils.visualization import save_images

    written = []
    if args.interpolate:
        generate_interpolation(model, args.num_steps, save_path=paths["interpolation"],
                               pairs=args.pairs, seed=args.seed, steps=steps, precision=precision)
        written.append(paths["interpolation"])
    if args.interpolate_real:
        from utils.data_loader import normalize_images

        test_images = test_digits()
        i, j = args.interpolate_real
        for index in (i, j):
            if not 0 <= index < len(test_images):
                raise ConfigError(f"--interpolate-real {index}: test-set indices run from 0 to "
                                  f"{len(test_images) - 1}")
        device = model.scheduler.betas.device
        real = normalize_images(test_images[[i, j]]).unsqueeze(1).to(device)
        latents = invert(model, real, args.inversion_steps, precision)
        images = interpolation_path(model, latents[:1], latents[1:], args.num_steps,
                                    args.inversion_steps, precision, clip_x0=False)[0]
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
    sys.exit(main())
