"""The rules every sampling path follows, each written once.

- `resolve`: the sampler, steps, eta, spacing, guidance and precision of a draw, from
  what was asked with the checkpoint's settings as defaults; ddpm takes every timestep;
  spacing 'tuned' is the checkpoint's TUNED_TIMESTEPS, and their count the steps.
- `labels_for`: image i of a draw for classes c_0 .. c_{k-1} is of class c_{i mod k}, so
  image i depends only on (seed, i, its class) whatever the batch or the process.
- `arrange`: the one layout of every picture of samples: one row per class asked for
  (row r: class c_r's images in order), or, without classes (or for one class), a
  square-ish grid at most 10 wide.
- `default_count`: 10 images per class asked for, 100 without classes.
- `choose_classes`: a conditional model draws the classes asked for, or all of them; an
  unconditional one refuses to be asked (`without_classes` says why), and one that learned
  clusters of its images (Config.CLUSTERS) draws them by itself, in proportion to their
  sizes (`DiffusionModel.sample`); `parse_classes` reads them as typed (7, 0-9, names).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from config import Config, ConfigError
from utils import machine

PER_CLASS = 10  # images per class in a default picture
UNCONDITIONAL_COUNT = 100  # images in a default picture without classes
MAX_WIDTH = 10  # images per row, at most, in a grid without classes


@dataclass(frozen=True)
class SamplingSettings:
    sampler: str
    steps: int
    eta: float
    spacing: str | tuple  # a spacing's name, or the timesteps themselves (tuned)
    guidance: float = 1.0
    guidance_rescale: float = 0.0
    precision: str = "fp32"
    autoguidance: float = 1.0
    interval: tuple | None = None  # (lo, hi]: the noise levels sigma where guidance acts

    @property
    def label(self) -> str:
        """'dpm-solver-20-eta1', 'ddpm-1000', 'ddim-50-quadratic', 'dpm-solver-20-eta1-ag2':
        names of output files."""
        text = f"{self.sampler}-{self.steps}"
        if self.sampler != "ddpm":
            spacing = self.spacing if isinstance(self.spacing, str) else "tuned"
            text += (f"-eta{self.eta:g}" if self.eta else "") + (
                f"-{spacing}" if spacing != "auto" else "")
        if self.autoguidance != 1:
            text += f"-ag{self.autoguidance:g}"
        if self.interval:
            text += f"-in{self.interval[0]:g}-{self.interval[1]:g}"
        return text

    def network_evaluations(self, conditional: bool) -> int:
        """Network evaluations per image (the guide's counted as the model's): two a step
        under guidance other than 0 or 1, one more with autoguidance."""
        doubled = conditional and self.guidance not in (0, 1)
        return self.steps * ((2 if doubled else 1) + (self.autoguidance != 1))

    def sample_kwargs(self) -> dict:
        """The keyword arguments of DiffusionModel.sample / generate."""
        return dict(sampler=self.sampler, steps=self.steps, eta=self.eta, spacing=self.spacing,
                    precision=self.precision, guidance=self.guidance,
                    guidance_rescale=self.guidance_rescale, autoguidance=self.autoguidance,
                    guidance_interval=self.interval)

    def deterministic(self) -> "SamplingSettings":
        """The same settings without sampling noise (eta 0); ddpm, which is stochastic by
        definition, becomes its deterministic stand-in DPM-Solver++ with 20 steps."""
        if self.sampler == "ddpm":
            return replace(self, sampler="dpm-solver", steps=min(20, self.steps), eta=0.0)
        return replace(self, eta=0.0)


def resolve_precision(precision: str, device) -> str:
    """'auto' -> bf16 where the hardware computes it (CUDA; a CPU with AVX-512 BF16 or AMX),
    fp32 elsewhere; other values as they are."""
    if precision == "auto":
        kind = torch.device(device).type
        native = kind == "cuda" or (kind == "cpu" and machine.native_bf16())
        return "bf16" if native else "fp32"
    return precision


def resolve(config: Config, sampler: str | None = None, steps: int | None = None,
            eta: float | None = None, spacing: str | None = None, guidance: float | None = None,
            guidance_rescale: float = 0.0, precision: str = "fp32",
            device="cpu", autoguidance: float | None = None,
            interval: tuple | None = None) -> SamplingSettings:
    """What to sample with: each value as asked, else the checkpoint's (`config`).

    ddpm is ancestral sampling over every timestep: it takes all TIMESTEPS steps, and
    asking it for another count is a ConfigError that names the respaced equivalent.
    Spacing 'tuned' becomes the checkpoint's TUNED_TIMESTEPS (scripts/tune_steps.py), which
    set the steps too."""
    sampler = sampler or config.SAMPLER
    timesteps = config.TIMESTEPS
    spacing = spacing or config.SPACING
    if spacing == "tuned":
        spacing = tuple(config.TUNED_TIMESTEPS)
        if not spacing:
            raise ConfigError("--spacing tuned: this checkpoint records no tuned timesteps; "
                              "find them with: python -m scripts.tune_steps --checkpoint CKPT "
                              "--steps N")
    if steps is None:
        steps = (len(spacing) if not isinstance(spacing, str) else
                 timesteps if sampler == "ddpm" else min(config.SAMPLING_STEPS, timesteps))
    if not isinstance(spacing, str) and steps != len(spacing):
        raise ConfigError(f"--steps {steps}: the tuned timesteps are {len(spacing)} "
                          f"({' '.join(map(str, spacing))}); leave out --steps, or choose "
                          f"another --spacing")
    if steps > timesteps:
        raise ConfigError(f"--steps {steps} exceeds the checkpoint's {timesteps} timesteps")
    if sampler == "ddpm" and steps != timesteps:
        raise ConfigError(f"--sampler ddpm always takes all {timesteps} steps; for --steps "
                          f"{steps} use --sampler ddim --eta 1 (the same sampler, respaced)")
    return SamplingSettings(sampler=sampler, steps=steps,
                            eta=config.ETA if eta is None else eta,
                            spacing=spacing,
                            guidance=config.GUIDANCE if guidance is None else guidance,
                            guidance_rescale=guidance_rescale,
                            precision=resolve_precision(precision, device),
                            autoguidance=config.AUTOGUIDANCE if autoguidance is None
                            else autoguidance,
                            interval=_interval(config.GUIDANCE_INTERVAL if interval is None
                                               else interval))


def _interval(interval) -> tuple | None:
    """(lo, hi) where guidance applies, or None for every noise level (also for 0 inf)."""
    if not interval or (interval[0] <= 0 and math.isinf(interval[1])):
        return None
    return tuple(float(v) for v in interval)


def for_training(config: Config) -> SamplingSettings:
    """The settings of a run's sample grids and evaluations: its own."""
    return resolve(config)


def choose_classes(config: Config, classes=None, what: str = "--digit") -> list[int] | None:
    """The classes to draw: as asked (a conditional checkpoint only; names or indices), or
    all of a conditional checkpoint's classes (its "no class" branch alone draws poor
    images); None (no classes) for an unconditional one."""
    if classes:
        if not config.CONDITIONAL:
            raise ConfigError(without_classes(config, what))
        return [class_index(config, c, what) for c in classes]
    return list(range(config.num_classes)) if config.CONDITIONAL else None


def without_classes(config: Config, what: str, checkpoint: str = "this one") -> str:
    """Why `what` cannot choose a class of a checkpoint trained without the dataset's
    classes (one that learned clusters of its images draws those by itself)."""
    if config.CLUSTERS:
        return (f"{what} needs a class-conditional checkpoint; {checkpoint} learned "
                f"{config.CLUSTERS} k-means clusters of its images instead of their classes "
                f"(--clusters) and draws each in proportion to its size, none to be asked for "
                f"(train one with: python main.py --conditional, the CPU preset's default)")
    return (f"{what} needs a class-conditional checkpoint; {checkpoint} was trained without "
            f"--conditional and draws random images only (train one with: python main.py "
            f"--conditional, the CPU preset's default)")


def class_index(config: Config, value, what: str = "--class") -> int:
    """A class by index or by name (case-insensitive); ConfigError names the valid ones."""
    names = config.class_names
    if isinstance(value, int) or str(value).strip().isdigit():
        index = int(value)
        if 0 <= index < len(names):
            return index
    else:
        lowered = [n.lower() for n in names]
        if str(value).strip().lower() in lowered:
            return lowered.index(str(value).strip().lower())
    raise ConfigError(f"{what} {value}: this checkpoint's classes are 0-{len(names) - 1}"
                      + ("" if names == tuple(map(str, range(len(names))))
                         else f" ({', '.join(names)})"))


def labels_for(classes: list[int] | None, count: int, first: int = 0,
               device="cpu") -> torch.Tensor | None:
    """The class of images first .. first + count - 1: image i draws classes[i mod k]."""
    if not classes:
        return None
    index = torch.arange(first, first + count) % len(classes)
    return torch.tensor(classes, dtype=torch.long)[index].to(device)


def default_count(classes: list[int] | None) -> int:
    return PER_CLASS * len(classes) if classes else UNCONDITIONAL_COUNT


def arrange(images: torch.Tensor, classes: list[int] | None,
            per_class: int | None = PER_CLASS) -> tuple[torch.Tensor, int]:
    """The picture of images drawn with `labels_for(classes, N)`: (images in reading order,
    images per row). Several classes: row r holds class classes[r]'s images (at most
    `per_class`; fewer images than classes: one each, a row each). Otherwise a square-ish
    grid at most MAX_WIDTH wide, of at most per_class rows. per_class None shows all."""
    k = len(classes or ())
    if k <= 1:
        shown = images if per_class is None else images[:per_class * MAX_WIDTH]
        width = min(MAX_WIDTH, max(1, math.ceil(math.sqrt(len(shown)))))
        return shown, width
    per = len(images) // k
    if per == 0:
        return images, 1
    rows = images[:per * k].reshape(per, k, *images.shape[1:]).transpose(0, 1)
    rows = rows[:, :per_class] if per_class else rows
    return rows.flatten(0, 1), rows.shape[1]


def row_labels(config: Config, classes: list[int] | None) -> list[str] | None:
    """Names beside the rows of a picture drawn by `arrange`: the class names, unless they
    are the digits 0-9 themselves (or there are no classes, or one)."""
    if not classes or len(classes) < 2 or all(n.isdigit() for n in config.class_names):
        return None
    return [config.class_names[c] for c in classes]


def format_classes(config: Config, classes: list[int]) -> str:
    """'0-9' for all of MNIST's digits in order, 'all 10' for all of another dataset's classes,
    else their names."""
    if classes == list(range(config.num_classes)):
        return f"0-{config.num_classes - 1}" if config.DATASET == "mnist" else f"all {config.num_classes}"
    return ", ".join(config.class_names[c] for c in classes)


def parse_classes(tokens: list[str]) -> list:
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
