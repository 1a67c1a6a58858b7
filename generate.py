"""Sample, evaluate and interpolate digits from a checkpoint (the model is rebuilt from it).

    python generate.py --checkpoint checkpoints/latest.pt               # a grid of digits
    python generate.py --checkpoint ckpt.pt --save-npz outputs/samples.npz
    python generate.py --checkpoint ckpt.pt --evaluate                  # FID etc. on 10,000
    python generate.py --evaluate-npz samples.npz                       # any source's samples
    python generate.py --checkpoint ckpt.pt --interpolate --num-steps 10
    python generate.py --checkpoint ckpt.pt --interpolate-real 0 1      # between test digits
    python generate.py --checkpoint ckpt.pt --chain                     # the reverse process
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from config import (Config, ConfigError, OneLineArgumentParser, add_config_arguments,
                    check_device, check_writable, config_overrides)

EVAL_DEFAULT_SAMPLES = 10_000


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="generate.py",
                              description="Generate MNIST digits from a checkpoint (README.md).")
    p.add_argument("--checkpoint", help="checkpoint written by main.py (e.g. checkpoints/latest.pt)")
    p.add_argument("--output", default="outputs/samples.png",
                   help="PNG path of the sample grid; other pictures go beside it "
                        "(default: outputs/samples.png)")
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
                                   "DOWNLOAD", "CHECKPOINT_DIR", "OUTPUT_DIR"},
                         default_note={**{name: "the checkpoint's setting"
                                          for name in ("SAMPLER", "ETA", "SPACING")},
                                       "PRECISION": "fp32; bf16 autocast is faster on GPUs"},
                         help_text={
                             "SAMPLER": "sampler for grids, --evaluate and --chain "
                                        "(interpolation always decodes with DDIM, eta 0)",
                             "PRECISION": "sampling precision (auto = bf16 on CUDA)",
                             "CHECKPOINT_DIR": "where the evaluation classifier is cached",
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
    if not args.checkpoint and not args.evaluate_npz:
        parser.error("--checkpoint is required (or --evaluate-npz to score a file of samples)")
    if args.output and Path(args.output).suffix.lower() != ".png":
        parser.error(f"--output must be a .png path, got {args.output}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    overrides = config_overrides(args)
    device = overrides.get("DEVICE", Config().DEVICE)
    out_dir = Path(overrides.get("OUTPUT_DIR", Config.OUTPUT_DIR))
    from utils.checkpoint import CheckpointError
    from utils.data_loader import MNISTNotFoundError

    try:
        check_device(device)
        check_writable(Path(args.output).parent, "--output")
        check_writable(out_dir, "--output-dir")
        return run(args, overrides, device, out_dir)
    except (ConfigError, CheckpointError, NpzError) as error:
        parser.exit(2, f"generate.py: error: {error}\n")
    except MNISTNotFoundError as error:
        parser.exit(1, f"generate.py: error: {error}\n")


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
    return torch.from_numpy(samples)


def run(args, overrides: dict, device: str, out_dir: Path) -> int:
    import torch

    from models.diffusion import DiffusionModel
    from utils.data_loader import to_uint8
    from utils.metrics import Evaluator, format_report, save_json
    from utils.visualization import save_images, show
    from utils.trainer import resolve_precision

    progress = not args.quiet
    output = Path(args.output)
    data_dir = overrides.get("DATA_DIR", Config.DATA_DIR)
    checkpoint_dir = overrides.get("CHECKPOINT_DIR", Config.CHECKPOINT_DIR)
    download = overrides.get("DOWNLOAD", Config.DOWNLOAD)

    def evaluator():
        return Evaluator(data_dir, checkpoint_dir, device, progress=progress, download=download)

    def test_digits():
        from utils.data_loader import load_mnist

        return load_mnist(data_dir, train=False, download=download)[0]

    if args.evaluate_npz:
        samples = load_npz(args.evaluate_npz)
        result = evaluator().evaluate(samples)
        result["source"] = str(args.evaluate_npz)
        path = save_json(result, out_dir / f"eval_{Path(args.evaluate_npz).stem}.json")
        print(format_report(result, f"{args.evaluate_npz}:"))
        print(f"metrics written to {path}")
        if not args.checkpoint:
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
    special = args.interpolate or args.interpolate_real or args.chain or args.forward
    written = []

    if not special or args.save_npz or args.evaluate:
        count = args.num_samples or (EVAL_DEFAULT_SAMPLES if args.evaluate else 64)
        start = time.perf_counter()
        images = model.generate(count, batch_size=args.batch_size, progress=progress,
                                **sample_kwargs)
        seconds = time.perf_counter() - start
        print(f"sampled {count} digits in {seconds:.1f} s ({count / seconds:.3g} images/s)")
        shown = images[:min(count, 100)]
        written.append(save_images(shown, output, nrow=max(1, min(10, int(len(shown) ** 0.5)))))
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
            written.append(save_json(result, out_dir / name))
            print(format_report(result, f"{args.checkpoint} ({label}):"))

    if args.interpolate or args.interpolate_real:
        written += interpolate(args, model, steps if sampler != "ddpm" else 50, precision,
                               output, test_digits)
    if args.chain:
        written += chain(args, model, sample_kwargs, output)
    if args.forward:
        from utils.data_loader import normalize_images
        from utils.visualization import visualize_diffusion_process

        x0 = normalize_images(test_digits()[:8]).unsqueeze(1)
        path = output.with_name(output.stem + "_forward.png")
        steps_shown = [min(round(f * config.TIMESTEPS), config.TIMESTEPS - 1) for f in
                       (0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]
        visualize_diffusion_process(model, x0, steps_shown, save_path=path)
        written.append(path)

    for path in written:
        print(f"wrote {path}")
    if args.show and written:
        show(written[0])
    return 0


def interpolate(args, model, steps, precision, output, test_digits) -> list[Path]:
    """Slerp between noise vectors (--interpolate) and between inverted test digits."""
    import torch

    from models.interpolation import interpolation_path, invert
    from utils.seeding import PerSampleNoise
    from utils.visualization import save_images

    written = []
    if args.interpolate:
        noise = PerSampleNoise(args.seed, range(2 * args.pairs), model.image_shape,
                               model.scheduler.betas.device).initial()
        path_images = interpolation_path(model, noise[0::2], noise[1::2], args.num_steps, steps,
                                         precision)
        path = output.with_name(output.stem + "_interpolation.png")
        written.append(save_images(path_images.flatten(0, 1), path, nrow=args.num_steps))
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
        path = output.with_name(output.stem + f"_interpolation_real_{i}_{j}.png")
        written.append(save_images(strip, path, nrow=len(strip)))
        print(f"real digits {i} and {j} at both ends; reconstruction error of the inversion: "
              f"{(images[[0, -1]] - real).abs().mean().item():.4f} (mean |pixel| in [-1, 1])")
    return written


def chain(args, model, sample_kwargs, output, columns: int = 11, gif_frames: int = 60
          ) -> list[Path]:
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
    png = save_chain([frames[k] for k in pick], output.with_name(output.stem + "_chain.png"),
                     [labels[k] for k in pick], title)
    every = max(1, len(frames) // gif_frames)
    gif_list = frames[::every] + ([frames[-1]] if (len(frames) - 1) % every else [])
    gif = save_gif(gif_list, output.with_name(output.stem + "_chain.gif"),
                   nrow=min(count, 8))
    return [png, gif]


if __name__ == "__main__":
    sys.exit(main())
