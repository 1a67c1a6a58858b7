"""The sampling functions: the Python API, and the jobs that generate.py dispatches to.

Each function takes a loaded model (`load_model`), draws with the checkpoint's settings
unless told otherwise (`sampling.settings.resolve`, the one resolver), and, given a
`save_path`, writes its picture there; it returns the images (in [-1, 1], on the CPU).
Image i of a draw depends only on (seed, i, its class), never on the batch size (up to
float rounding) or, under torchrun, on the number of processes.

    model = load_model("runs/NAME/latest.pt")            # or "pretrained"
    images = generate_images(model, 100, save_path="grid.png")
"""
from __future__ import annotations

import math

import torch

from config import ConfigError
from models.diffusion import DiffusionModel
from models.interpolation import class_weights, interpolation_path, invert
from sampling import pretrained
from sampling.editing import inpaint, sdedit
from sampling.settings import (SamplingSettings, arrange, choose_classes, class_index,
                               labels_for, resolve, row_labels)
from utils import distributed as dist
from utils.data_loader import normalize_images
from utils.datasets import open_dataset
from utils.seeding import PerSampleNoise
from utils.visualization import (display_available, plot_images, save_chain, save_gif,
                                 save_images, save_labelled_grid, visualize_diffusion_process)


def load_model(checkpoint_path="pretrained", device=None, ema: bool = True) -> DiffusionModel:
    """The DiffusionModel of a checkpoint, in eval mode on `device` (default: CUDA if
    present), ready to sample; `model.config` is the Config it was trained with.
    `checkpoint_path`: a checkpoint of main.py, a model folder of `python -m scripts.export`
    (config.json, model.safetensors), or "pretrained", the model that ships with the repo
    (its SHA-256 checked). ema=False
    loads the raw weights instead of their average. Raises CheckpointError (one line)
    for a missing or bad file."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = pretrained.resolve(checkpoint_path)
    model, _ = DiffusionModel.from_checkpoint(path, device, ema=ema)
    return model


def settings_for(model: DiffusionModel, sampler=None, steps=None, eta=None, spacing=None,
                 guidance=None, guidance_rescale: float = 0.0, precision: str = "fp32",
                 autoguidance: float | None = None,
                 guidance_interval: tuple | None = None) -> SamplingSettings:
    """`sampling.settings.resolve` with this model's checkpoint settings as defaults; a
    checkpoint's default autoguidance applies only where it keeps a guide."""
    if autoguidance is None and model.guide is None:
        autoguidance = 1.0
    return resolve(model.config, sampler, steps, eta, spacing, guidance, guidance_rescale,
                   precision, model.scheduler.betas.device, autoguidance, guidance_interval)


def _available_memory() -> int | None:
    """Bytes of memory this machine can still give (Linux: MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(count: int, image_shape: tuple, flag: str = "--num-samples") -> None:
    """ConfigError before sampling when `count` images cannot fit in memory at all."""
    needed = 2 * count * math.prod(image_shape) * 4  # float32, the batches and their concatenation
    available = _available_memory()
    if available is not None and needed > available:
        raise ConfigError(f"{flag} {count:,} needs about {needed / 2 ** 30:,.1f} GB of memory for "
                          f"the images alone; this machine has {available / 2 ** 30:,.1f} GB "
                          f"available: ask for fewer")


def draw(model: DiffusionModel, count: int, settings: SamplingSettings,
         classes: list[int] | None = None, seed: int = 0, batch_size: int = 500,
         progress: bool = True, guide: DiffusionModel | None = None) -> torch.Tensor | None:
    """Images 0 .. count-1 of (seed, classes) on the CPU. Under torchrun each process
    draws its share and rank 0 gets them all (the others get None). guide: autoguidance's
    (default: the model's own)."""
    check_memory(count, model.image_shape)
    part = dist.local_slice(count)
    labels = labels_for(classes, count)
    images = model.generate(part.stop - part.start, first_index=part.start,
                            batch_size=batch_size, progress=progress and dist.is_main(),
                            labels=None if labels is None else labels[part], seed=seed,
                            guide=guide, **settings.sample_kwargs())
    if not torch.isfinite(images).all():
        raise ConfigError("the model produced non-finite images: its weights are damaged "
                          "(use an earlier checkpoint of the run)")
    return dist.gather_to_rank0(images.cpu())


def save_grid(images: torch.Tensor, nrow: int, names: list[str] | None, path):
    """A grid of `arrange`d images; rows named when the classes are not digits."""
    if names:
        return save_labelled_grid(images, path, nrow, [""] * nrow, row_labels=names)
    return save_images(images, path, nrow=nrow)


def _show(images: torch.Tensor, nrow: int, title: str) -> None:
    if display_available():
        plot_images(images, title, nrow=nrow, figsize=None, show=True)


def generate_images(model, num_samples: int, device=None, save_path=None,
                    show_images: bool = True, sampler: str | None = None,
                    steps: int | None = None, eta: float | None = None, seed: int = 0,
                    batch_size: int = 500, precision: str = "fp32", progress: bool = True,
                    digits: list | None = None, guidance: float | None = None,
                    guidance_rescale: float = 0.0, autoguidance: float | None = None,
                    guide=None, guidance_interval: tuple | None = None):
    """Draw `num_samples` images: a (N, C, H, W) tensor in [-1, 1], on the CPU.

    Sampler, steps and eta default to the checkpoint's settings; image i depends only on
    (seed, i) (and on its class). digits: the classes to draw (a conditional checkpoint;
    indices or names; default all): image i draws digits[i mod k], with classifier-free
    guidance of scale `guidance` (default: the checkpoint's); the PNG then has one row per
    class. autoguidance A (default: the checkpoint's, where it keeps a guide; 1 = off)
    steers away from `guide` (default: `model.guide`, the run's early snapshot; or any
    `load_model(...)` of the same schedule); guidance_interval (lo, hi) limits guidance to
    those noise levels. save_path writes a PNG grid; show_images draws the grid where a
    display exists (a notebook, a desktop) and does nothing on a headless machine."""
    if device is not None:
        model = model.to(device)
    classes = choose_classes(model.config, digits, "digits")
    settings = settings_for(model, sampler, steps, eta, None, guidance, guidance_rescale,
                            precision, autoguidance, guidance_interval)
    images = draw(model, num_samples, settings, classes, seed, batch_size, progress, guide)
    if images is None:  # not rank 0 of several processes
        return None
    shown, nrow = arrange(images, classes)
    if save_path is not None:
        save_grid(shown, nrow, row_labels(model.config, classes), save_path)
    if show_images:
        _show(shown, nrow, f"{num_samples} samples")
    return images


def generate_interpolation(model, num_steps: int = 10, device=None, save_path=None,
                           pairs: int = 1, seed: int = 0, steps: int | None = None,
                           precision: str = "fp32", show_images: bool = False,
                           digits: list | None = None, guidance: float | None = None,
                           guidance_rescale: float = 0.0):
    """Decode a spherical path between `pairs` pairs of noise vectors (deterministic DDIM):
    a (pairs, num_steps, C, H, W) tensor in [-1, 1], on the CPU; one row per pair in
    the PNG at save_path. A conditional checkpoint keeps one class along each row: row r
    draws digits[r mod k] (default: all classes) with guidance `guidance` (default: the
    checkpoint's)."""
    if device is not None:
        model = model.to(device)
    settings = settings_for(model, "ddim", steps, 0.0, None, guidance, guidance_rescale,
                            precision)
    noise = PerSampleNoise(seed, range(2 * pairs), model.image_shape,
                           model.scheduler.betas.device).initial()
    classes = choose_classes(model.config, digits, "digits")
    labels = labels_for(classes, pairs, device=noise.device)
    images = interpolation_path(model, noise[0::2], noise[1::2], num_steps, settings.steps,
                                precision, labels=labels, guidance=settings.guidance,
                                guidance_rescale=guidance_rescale).cpu()
    if save_path is not None:
        save_images(images.flatten(0, 1), save_path, nrow=num_steps)
    if show_images:
        _show(images.flatten(0, 1), num_steps, "interpolation")
    return images


def generate_class_interpolation(model, first, last, num_steps: int = 10,
                                 device=None, save_path=None, pairs: int = 1, seed: int = 0,
                                 guidance: float | None = None, steps: int | None = None,
                                 precision: str = "fp32", sampler: str | None = None,
                                 spacing: str | None = None, guidance_rescale: float = 0.0):
    """Class `first` turning into class `last` at fixed noise (a conditional checkpoint;
    indices or names): column k is sampled with the class embedding (1 - a) e_first +
    a e_last, a = k/(K-1), deterministically (`sampler`, default the checkpoint's, with
    eta 0; DPM-Solver++ for ddpm), with classifier-free guidance `guidance` (default: the
    checkpoint's). Returns (pairs, num_steps, C, H, W) in [-1, 1] on the CPU; row r uses
    the noise of image r under `seed`."""
    first, last = choose_classes(model.config, [first, last], "interpolating between classes")
    if device is not None:
        model = model.to(device)
    settings = settings_for(model, sampler, steps, 0.0, spacing, guidance, guidance_rescale,
                            precision).deterministic()
    device = model.scheduler.betas.device
    e_first, e_last = (class_weights(model, torch.full((pairs,), c, device=device))
                       for c in (first, last))
    columns = [model.sample((pairs, *model.image_shape), seed=seed,
                            labels=(1 - a) * e_first + a * e_last, **settings.sample_kwargs()).cpu()
               for a in torch.linspace(0, 1, num_steps).tolist()]
    images = torch.stack(columns, dim=1)
    if save_path is not None:
        save_images(images.flatten(0, 1), save_path, nrow=num_steps)
    return images


def interpolate_real(model, first_image: torch.Tensor, last_image: torch.Tensor,
                     num_steps: int = 10, inversion_steps: int = 100, labels=None,
                     precision: str = "fp32", save_path=None) -> tuple[torch.Tensor, float]:
    """Between two real images (uint8 (C, H, W)): each inverted to the noise that DDIM with
    `inversion_steps` steps maps back to it, the noise slerped and decoded; a conditional
    checkpoint gets their two classes (`labels`), its class embedding moving along.
    Returns (the strip: real, num_steps decoded, real; in [-1, 1] on the CPU, and the mean
    |pixel| error of reconstructing the two ends)."""
    device = model.scheduler.betas.device
    real = normalize_images(torch.stack([first_image, last_image])).to(device)
    if model.conditional and labels is not None:
        labels = torch.as_tensor(labels).long().to(device)
    else:
        labels = None
    latents = invert(model, real, inversion_steps, precision, labels)
    ends = None if labels is None else (labels[:1], labels[1:])
    images = interpolation_path(model, latents[:1], latents[1:], num_steps, inversion_steps,
                                precision, clip_x0=False, labels=ends)[0]
    error = (images[[0, -1]] - real).abs().mean().item()
    strip = torch.cat([real[:1], images, real[1:]]).cpu()
    if save_path is not None:
        save_images(strip, save_path, nrow=len(strip))
    return strip, error


def guidance_strip(model, classes: list, guidances: list[float], seed: int = 0,
                   save_path=None, **settings) -> torch.Tensor:
    """What guidance does: row r draws class classes[r] from the noise of image r, once per
    guidance scale (the columns); a class listed twice gets two rows of different noise.
    settings: sampler, steps, eta, spacing, guidance_rescale, precision (default: the
    checkpoint's). Returns (rows * columns, C, H, W) in [-1, 1] on the CPU."""
    classes = choose_classes(model.config, classes, "--guidance")
    labels = torch.tensor(classes)
    columns = []
    for w in guidances:
        chosen = settings_for(model, guidance=w, **settings)
        columns.append(model.sample((len(classes), *model.image_shape), labels=labels,
                                    seed=seed, **chosen.sample_kwargs()).cpu())
    images = torch.stack(columns, dim=1).flatten(0, 1)
    if save_path is not None:
        names = model.config.class_names
        save_labelled_grid(images, save_path, len(guidances), [f"W={w:g}" for w in guidances],
                           "classifier-free guidance: eps_u + W (eps_c - eps_u)",
                           row_labels=[names[c] for c in classes])
    return images


def chain(model, count: int = 8, settings: SamplingSettings | None = None, classes=None,
          seed: int = 0, png_path=None, gif_path=None, columns: int = 11, gif_frames: int = 60,
          progress: bool = False) -> list[torch.Tensor]:
    """x_t along the reverse process for `count` samples: the frames x_T, ..., x_0 (each
    (count, C, H, W) on the CPU); a PNG grid of `columns` of them and an animated GIF."""
    settings = settings or settings_for(model)
    classes = choose_classes(model.config, classes, "--digit")
    states = []
    model.sample((count, *model.image_shape), first_index=0, progress=progress, seed=seed,
                 labels=labels_for(classes, count),
                 callback=lambda i, t, x, x0: states.append((t, x.clamp(-1, 1).cpu())),
                 **settings.sample_kwargs())
    x_T = PerSampleNoise(seed, range(count), model.image_shape, "cpu").initial()
    frames = [x_T] + [x for _, x in states]
    levels = [t for t, _ in states]  # the state after the step at levels[k] is at levels[k + 1]
    labels = ["x_T"] + [f"t={t}" for t in levels[1:]] + ["x_0"]
    pick = sorted({round(k * (len(frames) - 1) / (columns - 1)) for k in range(columns)})
    if png_path is not None:
        title = (f"reverse process, {settings.sampler} with {len(states)} steps: "
                 f"x_T (noise) -> x_0")
        save_chain([frames[k] for k in pick], png_path, [labels[k] for k in pick], title)
    if gif_path is not None:
        every = max(1, len(frames) // gif_frames)
        gif_list = frames[::every] + ([frames[-1]] if (len(frames) - 1) % every else [])
        save_gif(gif_list, gif_path, nrow=min(count, 8))
    return frames


def forward_process(model, images: torch.Tensor, save_path=None,
                    fractions=(0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)) -> torch.Tensor:
    """The forward (noising) process on real images (uint8 (N, C, H, W)): one row per
    image, one column per noise level (fractions of the timesteps)."""
    x0 = normalize_images(images)
    timesteps = model.timesteps
    shown = [min(round(f * timesteps), timesteps - 1) for f in fractions]
    return visualize_diffusion_process(model, x0, shown, save_path=save_path)


def dataset_of(config, data_dir=None, download: bool = True, log=print):
    """The dataset a checkpoint (its `config`) was trained on, found in data_dir (default:
    where it was) and checked against what the checkpoint recorded: other classes are a
    DataMismatchError (one line naming both lists), changed content a printed note."""
    dataset = open_dataset(config.DATASET, data_dir or config.DATA_DIR or None, download,
                           config.CHANNELS, config.IMAGE_SIZE)
    note = dataset.check_recorded(config.CLASS_NAMES, config.DATA_FINGERPRINT, "the checkpoint")
    if note:
        log(note)
    return dataset


def test_set(model, data_dir=None, download: bool = True):
    """The test split of the model's dataset: (uint8 images (N, C, H, W), labels (N,))."""
    return dataset_of(model.config, data_dir, download).load("test")


def test_images(model, indices, data_dir=None, download: bool = True,
                what: str = "--interpolate-real"):
    """Real test images (uint8 (N, C, H, W)) and labels of the model's dataset, by index;
    ConfigError names `what` and the valid range."""
    images, labels = test_set(model, data_dir, download)
    for index in indices:
        if not 0 <= index < len(images):
            raise ConfigError(f"{what} {index}: test-set indices run from 0 to {len(images) - 1}")
    return images[list(indices)], labels[list(indices)]


def class_of(model, value) -> int:
    """A class of the model by index or name (ConfigError otherwise)."""
    return class_index(model.config, value)


__all__ = ["load_model", "generate_images", "generate_interpolation",
           "generate_class_interpolation", "interpolate_real", "guidance_strip", "chain",
           "forward_process", "draw", "settings_for", "test_images", "class_of"]


def inpaint_images(model, images: torch.Tensor, mask: torch.Tensor, completions: int = 4,
                   steps: int = 25, resample: int = 4, digits: list | None = None,
                   guidance: float | None = None, seed: int = 0, precision: str = "fp32",
                   save_path=None, batch_size: int = 500) -> torch.Tensor:
    """`completions` inpaintings of each real image (uint8 (N, C, H, W)) where `mask` is 0
    (see sampling/editing.py: RePaint with `resample` passes per step; resample 1 is the
    plain replacement method). A conditional model completes toward digits[i mod k] with
    guidance (default: the checkpoint's), or, without digits, from the known pixels alone
    (the "no class" branch). Returns (N, completions, C, H, W) in [-1, 1] on the CPU; the
    picture has one row per image: the masked input, the completions, the original."""
    count = len(images)
    repeated = images.repeat_interleave(completions, dim=0)
    masks = mask.expand(count, *mask.shape[1:]).repeat_interleave(completions, dim=0) \
        if mask.shape[0] in (1, count) else mask
    labels, w = _editing_labels(model, digits, count * completions, guidance, unconditional=True)
    out = []
    for start in range(0, len(repeated), batch_size):
        part = slice(start, start + batch_size)
        out.append(inpaint(model, repeated[part], masks[part], steps, resample,
                           None if labels is None else labels[part], w, seed,
                           first_index=start, precision=precision).cpu())
    filled = torch.cat(out).reshape(count, completions, *images.shape[1:])
    if save_path is not None:
        real = normalize_images(images).float()
        shown_mask = mask.expand(count, *mask.shape[1:]).float()
        masked = real * shown_mask  # hidden pixels grey (0 in [-1, 1])
        rows = torch.cat([masked[:, None], filled, real[:, None]], dim=1)
        toward = (" toward " + ", ".join(model.config.class_names[d]
                                         for d in choose_classes(model.config, digits))
                  if digits else "")
        save_labelled_grid(rows.flatten(0, 1), save_path, completions + 2,
                           ["masked"] + [f"#{k + 1}" for k in range(completions)] + ["original"],
                           f"inpainting: " + (f"RePaint, {steps} steps x {resample} passes"
                                              if resample > 1 else f"replacement, {steps} steps")
                           + toward)
    return filled


def edit_images(model, images: torch.Tensor, strengths: list[float], digits: list | None = None,
                seed: int = 0, save_path=None, batch_size: int = 500,
                labels: torch.Tensor | None = None, **settings) -> torch.Tensor:
    """SDEdit of real images (uint8 (N, C, H, W)) at each strength in `strengths`: noised
    to that level and denoised toward digits[i mod k] (a conditional checkpoint) with the
    checkpoint's sampler and guidance (settings: sampler, steps, eta, spacing, guidance,
    guidance_rescale, precision override them). Returns (N, len(strengths), C, H, W) in
    [-1, 1] on the CPU; the picture has one row per image: the input, then one column per
    strength. labels: each image's own class instead of digits (re-drawn within its class)."""
    chosen = settings_for(model, **settings)
    count = len(images)
    if labels is None:
        labels, _ = _editing_labels(model, digits, count, chosen.guidance, unconditional=False)
    else:
        labels = labels.long().to(model.scheduler.betas.device)
    columns = []
    for strength in strengths:
        parts = [sdedit(model, images[s:s + batch_size], strength, chosen,
                        None if labels is None else labels[s:s + batch_size], seed,
                        first_index=s).cpu() for s in range(0, count, batch_size)]
        columns.append(torch.cat(parts))
    edited = torch.stack(columns, dim=1)
    if save_path is not None:
        real = normalize_images(images).float()
        rows = torch.cat([real[:, None], edited], dim=1)
        save_labelled_grid(rows.flatten(0, 1), save_path, len(strengths) + 1,
                           ["input"] + [f"S={s:g}" for s in strengths],
                           "SDEdit: noised to strength S, then denoised"
                           + (f" toward {', '.join(model.config.class_names[d] for d in choose_classes(model.config, digits))}"
                              if digits else ""))
    return edited


def _editing_labels(model, digits, count: int, guidance, unconditional: bool):
    """(labels or None, guidance) of an edit: the classes asked for (a conditional
    checkpoint), or none: for inpainting the "no class" branch (guidance 0), for SDEdit
    nothing to aim at."""
    config = model.config
    if digits:
        classes = choose_classes(config, digits, "--digit")
        w = config.GUIDANCE if guidance is None else guidance
        return labels_for(classes, count, device=model.scheduler.betas.device), w
    if config.CONDITIONAL and unconditional:
        return torch.full((count,), model.null_label, device=model.scheduler.betas.device), 0.0
    return None, 1.0


__all__ += ["inpaint_images", "edit_images"]
