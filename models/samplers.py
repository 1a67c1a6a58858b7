"""Samplers: ancestral DDPM, DDIM (with eta), DPM-Solver++ (2M and 3M, each with an SDE
variant) and the consistency sampler of distilled students, plus DDIM inversion.

Every sampler reads the schedule from a `NoiseScheduler` and turns network outputs
into (x0, eps) with `scheduler.split_model_output`; none re-derives a table.
A sampler takes the starting noise x_T and, if stochastic, a `noise(i)` callable
that returns the fresh noise of step i (see utils.seeding.PerSampleNoise), so that
image k of a run depends only on its own seed, never on the batch it was drawn in.

`denoiser(x, t)` is the network: (B, C, H, W), (B,) -> raw output (eps or v).
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from utils.noise_scheduler import NoiseScheduler

SAMPLERS = ("ddpm", "ddim", "dpm-solver", "dpm-solver-3m", "consistency")
SPACINGS = ("time", "quadratic", "logsnr", "trailing", "trailing-v1")
# each sampler's spacing when none is asked for
DEFAULT_SPACING = {"ddim": "time", "dpm-solver": "logsnr", "dpm-solver-3m": "logsnr",
                   "consistency": "trailing"}
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepNoise = Callable[[int], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Spacing = str | Sequence[int]  # a spacing's name, or the timesteps themselves


def timestep_sequence(timesteps: int, steps: int, spacing: Spacing = "time",
                      scheduler: NoiseScheduler | None = None,
                      start: int | None = None) -> list[int]:
    """`steps` distinct timesteps from `start` (default T-1) down, decreasing.

    The sampler evaluates the network once at each; after the last it steps to the clean
    data. spacing:
      'time'      evenly spaced in t, down to 0;
      'quadratic' t = (T-1) * u^2 for evenly spaced u (DDIM's choice for CIFAR-10);
      'logsnr'    evenly spaced in lambda = log(alpha / sigma), the step size DPM-Solver's
                  error analysis is written in (needs the scheduler);
      'trailing'  t_k = round(T (1 - k/steps)) - 1, k = 0 .. steps-1 (Lin et al. 2024,
                  Table 2: 999, 899, ..., 99 for T = 1000 and 10 steps): the last is
                  T/steps - 1, not 0, and halving `steps` keeps every other timestep (the
                  grids of distilled students, training/distill.py);
      'trailing-v1' round((T-1)(1 - k/steps)), this code's trailing grid before it was
                  aligned with Lin et al.'s (999, 899, ..., 500, ..., 100): students
                  distilled on it record it (Config.from_dict) and sample on it still;
      a sequence: these timesteps themselves (e.g. searched by scripts/tune_steps.py),
                  starting at the top.
    steps == T gives every timestep, T-1 .. 0, whatever the spacing (but trailing-v1). A `start` below T-1
    begins part-way, at a noise level that is not pure noise (SDEdit, editing); 'trailing'
    then reads T as start + 1.
    """
    top = timesteps - 1 if start is None else int(start)
    if not 0 <= top < timesteps:
        raise ValueError(f"start must lie in 0 .. {timesteps - 1}, got {top}")
    if not 1 <= steps <= top + 1:
        raise ValueError(f"steps must lie in 1 .. {top + 1} (the timesteps), got {steps}")
    if not isinstance(spacing, str):
        seq = [int(t) for t in spacing]
        if (len(seq) != steps or seq[0] != top or seq[-1] < 0
                or any(a <= b for a, b in zip(seq, seq[1:]))):
            raise ValueError(f"timesteps {seq} are not {steps} decreasing timesteps from "
                             f"{top} down to 0 or above")
        return seq
    if steps == 1:
        return [top]
    if spacing == "trailing":
        return [round((top + 1) * (steps - k) / steps) - 1 for k in range(steps)]
    if spacing == "trailing-v1":
        return [round((1 - k / steps) * top) for k in range(steps)]
    u = torch.linspace(1, 0, steps, dtype=torch.float64)
    if spacing == "time":
        seq = (u * top).round().long().tolist()
    elif spacing == "quadratic":
        seq = (u ** 2 * top).round().long().tolist()
    elif spacing == "logsnr":
        if scheduler is None:
            raise ValueError("logsnr spacing needs the scheduler")
        lam = 0.5 * torch.log(scheduler.snr.double().cpu())  # decreasing in t
        targets = lam[top] + (1 - u) * (lam[0] - lam[top])
        seq = [int((lam - target).abs().argmin()) for target in targets]
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}, "
                         f"or a list of timesteps")
    # make the sequence strictly decreasing while keeping both ends: rounding can repeat
    # a timestep where the spacing is finer than the table.
    for i in range(1, steps):
        seq[i] = min(seq[i], seq[i - 1] - 1)
    for i in range(steps - 1, -1, -1):
        seq[i] = max(seq[i], steps - 1 - i)
    assert seq[0] == top and seq[-1] == 0 and len(set(seq)) == steps, seq
    return seq


def predict(denoiser: Denoiser, scheduler: NoiseScheduler, x: torch.Tensor, t: int,
             prediction: str, clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output at timestep t for every image of x -> (x0, eps), in float32."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    out = denoiser(x, tt).float()
    assert out.shape == x.shape, (out.shape, x.shape)
    return scheduler.split_model_output(x, tt, out, prediction, clip_x0)


def ddpm_step(scheduler: NoiseScheduler, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} ~ N(posterior mean, posterior variance), DDPM Alg. 2.

    No noise is added where t == 0 (the last step returns the posterior mean).
    """
    mean, _, log_variance = scheduler.q_posterior(x0, xt, t)
    if noise is None:
        return mean
    nonzero = (t != 0).float().reshape(-1, *([1] * (xt.dim() - 1)))
    return mean + nonzero * torch.exp(0.5 * log_variance) * noise


def ddim_step(scheduler: NoiseScheduler, xt: torch.Tensor, t: int, t_prev: int,
              x0: torch.Tensor, eps: torch.Tensor, eta: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """x_t -> x_{t_prev} by DDIM (Song et al. 2021, eq. 12); t_prev = -1 is the clean data.

    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev);
    eta = 1 over every timestep is the ancestral DDPM sampler, eta = 0 is deterministic.
    """
    b = xt.shape[0]
    abar = scheduler.alpha_bar(torch.full((b,), t, dtype=torch.long, device=xt.device))
    abar_prev = scheduler.alpha_bar(torch.full((b,), t_prev, dtype=torch.long, device=xt.device))
    shape = (b,) + (1,) * (xt.dim() - 1)
    abar_prev = abar_prev.reshape(shape)
    abar = abar.reshape(shape)
    if eta > 0:
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    else:  # also serves inversion, where t_prev > t and the formula above is undefined
        sigma = torch.zeros_like(abar_prev)
    x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev >= 0:
        x = x + sigma * noise
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, scheduler: NoiseScheduler, x: torch.Tensor,
                noise: StepNoise, prediction: str = "eps", clip_x0: bool = True,
                callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling over all T timesteps (DDPM Algorithm 2), from x = x_T."""
    steps = list(range(scheduler.timesteps - 1, -1, -1))
    for i, t in enumerate(tqdm(steps, desc="ddpm", leave=False, disable=not progress)):
        x0, _ = predict(denoiser, scheduler, x, t, prediction, clip_x0)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x = ddpm_step(scheduler, x, tt, x0, noise(i) if t > 0 else None)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, scheduler: NoiseScheduler, x: torch.Tensor, steps: int,
                eta: float = 0.0, noise: StepNoise | None = None, prediction: str = "eps",
                clip_x0: bool = True, callback: Callback | None = None,
                progress: bool = False, spacing: Spacing = "time",
                start: int | None = None) -> torch.Tensor:
    """DDIM over `steps` timesteps (see timestep_sequence), from x = x_T (or x at `start`)."""
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise source")
    seq = timestep_sequence(scheduler.timesteps, steps, spacing, scheduler, start)
    for i, t in enumerate(tqdm(seq, desc="ddim", leave=False, disable=not progress)):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        x0, eps = predict(denoiser, scheduler, x, t, prediction, clip_x0)
        x = ddim_step(scheduler, x, t, t_prev, x0, eps, eta,
                      noise(i) if eta > 0 and t_prev >= 0 else None)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpm_solver(denoiser: Denoiser, scheduler: NoiseScheduler, x: torch.Tensor,
                      steps: int, prediction: str = "eps", clip_x0: bool = True,
                      callback: Callback | None = None, progress: bool = False,
                      spacing: Spacing = "logsnr", eta: float = 0.0,
                      noise: StepNoise | None = None, start: int | None = None,
                      order: int = 2) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), or with `order` 3 its third-order
    multistep form (3M, the DPM-Solver code's multistep third-order update), from x = x_T
    (or x at `start`).

    In lambda = log(alpha / sigma), with alpha = sqrt(abar), sigma = sqrt(1 - abar), and
    x0_i the network's x0 prediction at step i:
        h_i = lambda_{i} - lambda_{i-1},  r_i = h_{i-1} / h_i,
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
        2M: D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}   (first order: D = x0);
        3M: with d_0 = (x0_{i-1} - x0_{i-2}) / r_i, d_1 = (x0_{i-2} - x0_{i-3}) / r_{i-1},
            D1 = d_0 + r_i / (r_i + r_{i-1}) (d_0 - d_1),  D2 = (d_0 - d_1) / (r_i + r_{i-1}),
            x_i += alpha_i (phi_2 D1 - phi_3 D2),  phi_2 = (exp(-h) - 1) / h + 1,
            phi_3 = phi_2 / h - 1/2   (on top of the first-order step with D = x0_{i-1}).
    The multistep history starts empty: the first step is first order, the second at most
    second order. The last step, to the clean data (sigma = 0), is x = x0; with fewer than
    15 steps the step before it is first order too and the one before that at most second
    ("lower_order_final", which the DPM-Solver authors found key to stability at few steps).

    eta > 0 solves the reverse SDE instead (SDE-DPM-Solver++, the paper's appendix; eta = 1
    is its SDE, eta between 0 and 1 a mix with the ODE as in k-diffusion, whose 3M SDE this
    follows): h becomes (1 + eta) h in the coefficients of x0 and its differences, and
        x_i = (sigma_i / sigma_{i-1}) e^{-eta h} x_{i-1} + ... + sigma_i sqrt(1 - e^{-2 eta h}) z.
    Fresh noise corrects some of an imperfect network's errors, at the price of more steps.
    """
    if order not in (2, 3):
        raise ValueError(f"DPM-Solver++ is implemented with order 2 or 3, got {order}")
    if eta > 0 and noise is None:
        raise ValueError("DPM-Solver++ with eta > 0 needs a noise source")
    seq = timestep_sequence(scheduler.timesteps, steps, spacing, scheduler, start)
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)

    def alpha_sigma_lambda(t: int):
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        abar = scheduler.alpha_bar(tt).reshape(shape)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    x0s, hs = [], []  # the x0 predictions and step sizes so far, newest last
    for i, t in enumerate(tqdm(seq, desc="dpm-solver", leave=False, disable=not progress)):
        x0, _ = predict(denoiser, scheduler, x, t, prediction, clip_x0)
        if i + 1 == len(seq):
            x = x0
        else:
            _, sigma, lam = alpha_sigma_lambda(t)
            alpha_next, sigma_next, lam_next = alpha_sigma_lambda(seq[i + 1])
            h = lam_next - lam
            k = min(order, len(x0s) + 1)  # this step's order
            if steps < 15:
                k = min(k, len(seq) - 1 - i)
            if k == 2:
                r = hs[-1] / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0s[-1]
            else:
                d = x0
            u = (1 + eta) * h
            x = (sigma_next / sigma) * torch.exp(-eta * h) * x - alpha_next * torch.expm1(-u) * d
            if k == 3:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0, d1_1 = (x0 - x0s[-1]) / r0, (x0s[-1] - x0s[-2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = torch.expm1(-u) / u + 1
                x = x + alpha_next * (phi_2 * d1 - (phi_2 / u - 0.5) * d2)
            if eta > 0:
                x = x + sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * noise(i)
            x0s, hs = (x0s + [x0])[-2:], (hs + [h])[-2:]
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, scheduler: NoiseScheduler, x: torch.Tensor,
                       steps: int, noise: StepNoise | None, prediction: str = "v",
                       clip_x0: bool = True, callback: Callback | None = None,
                       progress: bool = False, spacing: Spacing = "trailing") -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a student whose
    x0 prediction maps any point of the teacher's trajectory to its end: x0 = f(x_T, T-1);
    then, at each further timestep t_k of the (trailing) grid, x = alpha x0 + sigma z and
    x0 = f(x, t_k). One network evaluation per step; `steps` = 1 is a one-step sampler."""
    seq = timestep_sequence(scheduler.timesteps, steps, spacing, scheduler)
    x0 = x
    for i, t in enumerate(tqdm(seq, desc="consistency", leave=False, disable=not progress)):
        if i > 0:
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x, _ = scheduler.add_noise(x0, tt, noise(i - 1))
        x0, _ = predict(denoiser, scheduler, x, t, prediction, clip_x0)
        if callback is not None:
            callback(i, t, x0, x0)
    return x0


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, scheduler: NoiseScheduler, x0: torch.Tensor, steps: int,
                prediction: str = "eps", progress: bool = False,
                spacing: str = "time") -> torch.Tensor:
    """Run deterministic DDIM forwards in time: clean images -> their x_T.

    Uses the timesteps of `sample_ddim(..., steps, eta=0)` in reverse; the network's eps
    at each timestep carries x to the next noisier one (Song et al. 2021, sec. 4.3).
    Sampling the result with the same `steps` returns close to x0.
    """
    seq = timestep_sequence(scheduler.timesteps, steps, spacing, scheduler)[::-1]  # 0 .. T-1
    x = x0  # the clean image stands in for the level t = 0 at the first step
    pairs = list(zip(seq[:-1], seq[1:]))
    for t, t_next in tqdm(pairs, desc="ddim inversion", leave=False, disable=not progress):
        x0_hat, eps = predict(denoiser, scheduler, x, t, prediction, clip_x0=False)
        x = ddim_step(scheduler, x, t, t_next, x0_hat, eps, eta=0.0, noise=None)
    return x


def sample(denoiser: Denoiser, scheduler: NoiseScheduler, x: torch.Tensor,
           sampler: Literal["ddpm", "ddim", "dpm-solver", "dpm-solver-3m", "consistency"]
           = "dpm-solver", steps: int | None = None,
           eta: float = 0.0, noise: StepNoise | None = None, prediction: str = "eps",
           clip_x0: bool = True, callback: Callback | None = None,
           progress: bool = False, spacing: Spacing | None = None,
           start: int | None = None) -> torch.Tensor:
    """Dispatch to a sampler by name. steps=None means every timestep; spacing=None
    takes the sampler's default (DEFAULT_SPACING: time for ddim, logsnr for dpm-solver,
    trailing for consistency). `start`: x is at that timestep rather than at T-1 (ddim and dpm-solver)."""
    steps = scheduler.timesteps if steps is None else steps
    if sampler == "ddpm":
        if start is not None:
            raise ValueError("the ddpm sampler starts from pure noise; use ddim with eta 1")
        if steps != scheduler.timesteps:
            raise ValueError(f"the ddpm sampler takes all {scheduler.timesteps} steps; for "
                             f"fewer, use ddim with eta 1 (the same sampler, respaced)")
        return sample_ddpm(denoiser, scheduler, x, noise, prediction, clip_x0, callback, progress)
    if sampler == "ddim":
        return sample_ddim(denoiser, scheduler, x, steps, eta, noise, prediction, clip_x0,
                           callback, progress, spacing or DEFAULT_SPACING[sampler], start)
    if sampler in ("dpm-solver", "dpm-solver-3m"):
        return sample_dpm_solver(denoiser, scheduler, x, steps, prediction, clip_x0, callback,
                                 progress, spacing or DEFAULT_SPACING[sampler], eta, noise, start,
                                 order=3 if sampler == "dpm-solver-3m" else 2)
    if sampler == "consistency":
        if start is not None:
            raise ValueError("the consistency sampler starts from pure noise")
        return sample_consistency(denoiser, scheduler, x, steps, noise, prediction, clip_x0,
                                  callback, progress, spacing or DEFAULT_SPACING[sampler])
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
