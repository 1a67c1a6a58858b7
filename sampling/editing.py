"""Editing real images with a trained model, no new training: inpainting and SDEdit.

Inpainting (RePaint, Lugmayr et al. 2022, on a respaced schedule): the hidden pixels are
drawn by the model while the known ones are held to the real image. At each step from
timestep t to the next, t', the known region is replaced by the real image noised to
level t (q(x_t | x_0)), the model takes one ancestral DDIM step (eta = 1) to t', and,
`resample - 1` times, the result is noised back to t (q(x_t | x_t')) and the step taken
again, so that the generated region can adapt to the known one (RePaint's resampling;
resample = 1 is the plain replacement method of Song et al. 2021, the naive baseline).
At the end the known pixels are pasted back exactly.

SDEdit (Meng et al. 2022): a real image noised to the level of strength S (timestep
S (T - 1); S = 0 returns the image, S = 1 starts from noise that keeps none of it) is
denoised with the checkpoint's sampler toward a class, with classifier-free guidance.

Masks are (N, 1, H, W) or (1, 1, H, W) tensors, 1 where a pixel is known; `make_mask`
builds the built-in ones. Every random draw comes from per-image generators, so image
i's result depends only on (seed, i), never on the batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import ConfigError
from models import samplers
from sampling.settings import SamplingSettings
from utils.data_loader import normalize_images
from utils.seeding import PerSampleNoise

MASKS = ("top", "bottom", "left", "right", "centre", "random")


def make_mask(name: str, count: int, side: int, seed: int = 0) -> torch.Tensor:
    """A built-in mask, (count, 1, side, side), 1 = known: 'top' hides the top half
    (the model draws it), 'bottom', 'left', 'right' likewise, 'centre' a centred box of
    half the side, 'random' three random boxes of a quarter to half the side per image."""
    mask = torch.ones(count, 1, side, side)
    half = side // 2
    if name == "top":
        mask[..., :half, :] = 0
    elif name == "bottom":
        mask[..., half:, :] = 0
    elif name == "left":
        mask[..., :, :half] = 0
    elif name == "right":
        mask[..., :, half:] = 0
    elif name == "centre":
        q = side // 4
        mask[..., q:q + half, q:q + half] = 0
    elif name == "random":
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            for _ in range(3):
                h, w = rng.integers(side // 4, half + 1, size=2)
                y, x = rng.integers(0, side - h + 1), rng.integers(0, side - w + 1)
                mask[i, :, y:y + h, x:x + w] = 0
    else:
        raise ConfigError(f"unknown --mask {name!r}; expected one of {', '.join(MASKS)} or a "
                          f"PNG file")
    return mask


def load_mask(path, side: int) -> torch.Tensor:
    """A mask from a PNG of side x side pixels: white (>= 128) = known, dark = hidden; in a
    picture with transparency, transparent (alpha < 128) = hidden, whatever its colour (as
    image editors mark the part to redraw). A mask that hides nothing, or everything, is a
    ConfigError: the first would return the image, the second is plain sampling."""
    path = Path(path)
    try:
        with Image.open(path) as picture:
            if picture.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in picture.info:
                array = np.asarray(picture.convert("RGBA"))[..., 3]
                what = "its transparent pixels"
            else:
                array = np.asarray(picture.convert("L"))
                what = "its dark pixels"
    except (OSError, ValueError) as error:
        raise ConfigError(f"--mask {path} cannot be read as an image ({type(error).__name__})") \
            from None
    if array.shape != (side, side):
        raise ConfigError(f"--mask {path} is {array.shape[1]}x{array.shape[0]} pixels; the "
                          f"model's images are {side}x{side}")
    known = array >= 128
    if known.all():
        raise ConfigError(f"--mask {path} hides nothing ({what} mark the part to redraw, and it "
                          f"has none): inpainting would return the image unchanged")
    if not known.any():
        raise ConfigError(f"--mask {path} hides every pixel: that is drawing a new image, not "
                          f"completing one (python generate.py, or --edit --strength 1)")
    return torch.from_numpy(known.astype(np.float32))[None, None]


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The mask broadcast to the images' batch and size, its values 0 or 1."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != images.shape[-2:] \
            or mask.shape[0] not in (1, images.shape[0]):
        raise ConfigError(f"a mask has shape (N or 1, 1, H, W) = (.., 1, {images.shape[-2]}, "
                          f"{images.shape[-1]}) here, got {tuple(mask.shape)}")
    if not torch.all((mask == 0) | (mask == 1)):
        raise ConfigError("a mask holds only 0 (hidden) and 1 (known)")
    return mask.expand(images.shape[0], 1, *images.shape[-2:]).float()


def _as_model_images(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (N, C, H, W) or float in [-1, 1] -> float on the model's device."""
    return (normalize_images(images) if images.dtype == torch.uint8 else images.float()).to(device)


@torch.no_grad()
def inpaint(model, images: torch.Tensor, mask: torch.Tensor, steps: int = 25,
            resample: int = 4, labels: torch.Tensor | None = None, guidance: float = 1.0,
            seed: int = 0, first_index: int = 0, precision: str = "fp32") -> torch.Tensor:
    """Fill the hidden pixels (mask 0) of `images` (uint8 (N, C, H, W), or float in
    [-1, 1]); the known ones (mask 1) come back exactly. RePaint with `resample` passes per
    step over `steps` timesteps (eta 1, time spacing): steps * resample network evaluations
    (twice that under guidance other than 0 and 1). labels: the class to complete to (a
    conditional model). Returns float images in [-1, 1] on the model's device."""
    device = model.scheduler.betas.device
    x0 = _as_model_images(images, device)
    mask = check_mask(mask, x0).to(device)
    if resample < 1:
        raise ConfigError(f"--resample must be at least 1, got {resample}")
    scheduler = model.scheduler
    denoiser = model.denoiser(precision, labels, guidance)
    noise = PerSampleNoise(seed, range(first_index, first_index + len(x0)), x0.shape[1:], device)
    draws = iter(range(10 ** 9))  # every fresh noise of a run has its own index
    seq = samplers.timestep_sequence(scheduler.timesteps, steps, "time", scheduler)
    x = noise.initial()
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        for r in range(resample):
            known, _ = scheduler.add_noise(x0, _full(x0, t), noise(next(draws)))
            x = mask * known + (1 - mask) * x
            x_prev = _ddim_step(model, denoiser, x, t, t_prev, noise(next(draws)))
            if r + 1 < resample and t_prev >= 0:  # back to t: the forward step t_prev -> t
                x = _renoise(scheduler, x_prev, t_prev, t, noise(next(draws)))
        x = x_prev
    return (mask * x0 + (1 - mask) * x.clamp(-1, 1)).clamp(-1, 1)


def _full(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _ddim_step(model, denoiser, x, t: int, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t -> x_t_prev (DDIM with eta 1), through the samplers' parts."""
    x0_hat, eps = samplers.predict(denoiser, model.scheduler, x, t, model.prediction,
                                    model.clip_x0)
    return samplers.ddim_step(model.scheduler, x, t, t_prev, x0_hat, eps, 1.0,
                              noise if t_prev >= 0 else None)


def _renoise(scheduler, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor):
    """x at level t_from -> a draw of q(x_t_to | x_t_from), t_to > t_from (RePaint's jump)."""
    a_from = scheduler.alpha_bar(_full(x, t_from)).reshape(-1, *[1] * (x.dim() - 1))
    a_to = scheduler.alpha_bar(_full(x, t_to)).reshape(-1, *[1] * (x.dim() - 1))
    ratio = a_to / a_from
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


@torch.no_grad()
def sdedit(model, images: torch.Tensor, strength: float, settings: SamplingSettings,
           labels: torch.Tensor | None = None, seed: int = 0,
           first_index: int = 0) -> torch.Tensor:
    """SDEdit: `images` (uint8 (N, C, H, W), or float in [-1, 1]) noised to timestep
    strength (T - 1), then denoised by the sampler of `settings` (ddpm: DDIM with eta 1)
    over about strength * steps of its steps, toward `labels` with its guidance. Strength 0
    returns the images. Returns float images in [-1, 1] on the model's device."""
    if not 0 <= strength <= 1:
        raise ConfigError(f"--strength must lie in [0, 1], got {strength:g}")
    device = model.scheduler.betas.device
    x0 = _as_model_images(images, device)
    if strength == 0:
        return x0.clamp(-1, 1)
    scheduler = model.scheduler
    start = round(strength * (scheduler.timesteps - 1))
    steps = max(1, min(start + 1, round(strength * settings.steps)))
    sampler, eta = settings.sampler, settings.eta
    if sampler == "ddpm":
        sampler, eta = "ddim", 1.0
    noise = PerSampleNoise(seed, range(first_index, first_index + len(x0)), x0.shape[1:], device)
    x, _ = scheduler.add_noise(x0, _full(x0, start), noise.initial())
    denoiser = model.denoiser(settings.precision, labels, settings.guidance,
                              settings.guidance_rescale)
    # tuned timesteps (a tuple) begin at T-1, an edit part-way: it takes the sampler's default
    named = isinstance(settings.spacing, str) and settings.spacing != "auto"
    spacing = settings.spacing if named else None
    x = samplers.sample(denoiser, scheduler, x, sampler, steps, eta, noise, model.prediction,
                        model.clip_x0, spacing=spacing, start=start)
    return x.clamp(-1, 1)
