"""Interpolation between digits, through the noise that a deterministic sampler maps to them.

Straight lines between two Gaussian noise vectors pass through vectors of unusually
small norm (the midpoint of two independent N(0, I) draws has norm ~ 0.71 times theirs),
which decode to faint blobs. Spherical interpolation keeps the norm, so every point on
the path is a plausible x_T and decodes, with DDIM (eta = 0), to a plausible digit.

A class-conditional model also needs a class along the path: the same digit at both ends,
or, between two different digits, the class embedding moved linearly with the noise.
"""
from __future__ import annotations

import torch

from models import samplers


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each pair of rows of z0, z1 (any shape, batch first).

    alpha = 0 gives z0, alpha = 1 gives z1; norms change smoothly between theirs.
    Falls back to linear interpolation for (near-)parallel vectors.
    """
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    alpha = torch.as_tensor(alpha, dtype=torch.float64, device=a.device)
    sin = torch.sin(theta)
    near = sin.abs() < 1e-6
    w0 = torch.where(near, 1 - alpha, torch.sin((1 - alpha) * theta) / torch.where(near, 1.0, sin))
    w1 = torch.where(near, alpha, torch.sin(alpha * theta) / torch.where(near, 1.0, sin))
    return (w0 * a + w1 * b).to(z0.dtype).reshape(z0.shape)


@torch.no_grad()
def decode(model, x_T: torch.Tensor, steps: int, precision: str = "fp32",
           clip_x0: bool | None = None, labels: torch.Tensor | None = None,
           guidance: float = 1.0, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x_T to images in [-1, 1]. clip_x0=False undoes
    `invert` exactly (inversion cannot clip); None takes the model's setting. labels,
    guidance and its rescale: a conditional model's classes (see DiffusionModel.denoiser)."""
    clip = model.clip_x0 if clip_x0 is None else clip_x0
    denoiser = model.denoiser(precision, labels, guidance, guidance_rescale)
    x = samplers.sample_ddim(denoiser, model.scheduler, x_T,
                             steps, eta=0.0, prediction=model.prediction, clip_x0=clip)
    return x.clamp(-1, 1)


def class_weights(model, labels: torch.Tensor) -> torch.Tensor:
    """(P,) digits -> (P, num_classes + 1) one-hot class weights (see UNet.embed_class)."""
    return torch.nn.functional.one_hot(labels.long(), model.num_classes + 1).float()


@torch.no_grad()
def interpolation_path(model, z0: torch.Tensor, z1: torch.Tensor, num_steps: int, steps: int,
                       precision: str = "fp32", clip_x0: bool | None = None,
                       labels: torch.Tensor | tuple | None = None,
                       guidance: float = 1.0, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Decode `num_steps` slerp points between each pair (z0[i], z1[i]).

    labels (a conditional model): (P,) digits, one per pair, or a pair (y0, y1) of them,
    the classes at the two ends; the class weights then move linearly with the noise,
    (1 - a) e_y0 + a e_y1 at slerp fraction a. Returns images of shape
    (P, num_steps, C, H, W) for P pairs.
    """
    alphas = torch.linspace(0, 1, num_steps)
    points = torch.stack([slerp(z0, z1, float(a)) for a in alphas], dim=1)  # (P, K, C, H, W)
    weights = None
    if labels is not None:
        y0, y1 = labels if isinstance(labels, tuple) else (labels, labels)
        w0, w1 = class_weights(model, y0), class_weights(model, y1)
        weights = torch.stack([(1 - a) * w0 + a * w1 for a in alphas.tolist()], dim=1)
        weights = weights.flatten(0, 1).to(z0.device)  # (P * K, num_classes + 1)
    images = decode(model, points.flatten(0, 1), steps, precision, clip_x0, weights, guidance,
                    guidance_rescale)
    return images.reshape(points.shape)


@torch.no_grad()
def invert(model, images: torch.Tensor, steps: int, precision: str = "fp32",
           labels: torch.Tensor | None = None) -> torch.Tensor:
    """Real images in [-1, 1] -> the x_T that DDIM with `steps` steps maps back to them
    (a conditional model: given their digits, unguided)."""
    return samplers.ddim_invert(model.denoiser(precision, labels), model.scheduler, images,
                                steps, prediction=model.prediction)
