"""The schedules of a training run: the learning rate over its budget, and the EMA's decay.

The learning rate warms up linearly over LR_WARMUP_STEPS, then follows LR_SCHEDULE over
the fraction of the budget used (the trainer's `budget_fraction`): constant, or a decay
to LR_FLOOR (a fraction of the peak) exactly at the budget's end: linear, cosine, or wsd
(warm-up, stable, decay: the peak for 80% of the budget, linear over the last 20%).
LEARNING_RATE is for batch 128 and scales as sqrt(batch / 128).

The EMA of the weights decays by a constant (EMA_DECAY, with a warm-up) or by EDM2's
power function (Karras et al. 2024), whose averaging length grows with the run.
"""
from __future__ import annotations

import math

from config import Config


def lr_decay(schedule: str, fraction: float, floor: float = 0.0) -> float:
    """The learning-rate factor at `fraction` (0 .. 1) of the budget: 1 at the start,
    `floor` at the end. 'wsd' (warm-up, stable, decay) holds 1 for 80% of the budget and
    decays linearly over the last 20%."""
    f = min(max(fraction, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        shape = 1.0 - f
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * f))
    elif schedule == "wsd":
        shape = min(1.0, (1.0 - f) / 0.2)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, linear, cosine, wsd")
    return floor + (1.0 - floor) * shape


def base_lr(config: Config) -> float:
    """LEARNING_RATE is for batch 128; scaled by sqrt(batch / 128) for other sizes."""
    return config.LEARNING_RATE * math.sqrt(config.BATCH_SIZE / 128)


def lr_at(config: Config, step: int, fraction: float = 0.0) -> float:
    """Linear warm-up over LR_WARMUP_STEPS, times the decay at `fraction` of the budget."""
    warmup = config.LR_WARMUP_STEPS
    return (base_lr(config) * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
            * lr_decay(config.LR_SCHEDULE, fraction, config.LR_FLOOR))


def power_ema_gamma(std: float) -> float:
    """EDM2's exponent gamma for a power-function EMA of relative width `std` (sigma_rel):
    the root of std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (Karras et al. 2024, eq. 3)."""
    lo, hi = 0.0, 1e6
    width = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))  # decreasing in g
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if width(mid) > std else (lo, mid)
    return 0.5 * (lo + hi)


class EmaSchedule:
    """The EMA's decay for the update after each optimizer step."""

    def __init__(self, config: Config):
        self.rule, self.decay, self.warmup = config.EMA_RULE, config.EMA_DECAY, config.EMA_WARMUP
        self.gamma = power_ema_gamma(config.EMA_STD)  # for EMA_RULE 'power'

    def __call__(self, step: int) -> float:
        """Decay after optimizer step `step` (0-indexed).

        'power' is EDM2's power-function EMA (Karras et al. 2024, eq. 2): decay
        (1 - 1/t)^(gamma + 1) at t = step + 1, which averages the weights of the whole run
        so far with weights growing as t^gamma; gamma is set so that the ages of the
        averaged weights have a standard deviation of EMA_STD times the run's length."""
        if self.rule == "power":
            t = step + 1
            return (1.0 - 1.0 / t) ** (self.gamma + 1.0)
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay
