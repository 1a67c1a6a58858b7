"""Every setting of a run, with its default, in one place; and the flags derived from it.

`Config` is the single source of truth: `main.py` derives its command-line flags
from it (`BATCH_SIZE` -> `--batch-size`, the comment becomes the help text, the
`# --- section ---` comments become the groups of --help), a checkpoint stores it as
plain values, and `generate.py` rebuilds the model from it. Build one Config per run
with `Config(**overrides)`, `Config.from_preset(...)` or `config.replace(...)`; it is
frozen, so nothing changes it mid-run. `PRESETS` name groups of settings for common
machines; `config_for_resume` says which settings a resumed run may change.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import torch

from utils.datasets import NAMES as DATASETS
from utils.datasets import builtin_classes, builtin_train_size
from utils.errors import ConfigError  # noqa: F401  (raised by validate; defined with its exit code)

Schedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "v", "edm"]
LossWeighting = Literal["none", "min-snr", "sigmoid"]
TimestepSampling = Literal["uniform", "lognormal"]
LRSchedule = Literal["constant", "linear", "cosine", "wsd"]
EMARule = Literal["constant", "power"]
Sampler = Literal["ddpm", "ddim", "dpm-solver", "dpm-solver-3m", "consistency"]
Precision = Literal["auto", "fp32", "bf16"]
Preset = Literal["none", "cpu"]
Spacing = Literal["auto", "time", "quadratic", "logsnr", "trailing", "trailing-v1", "tuned"]
DistillMethod = Literal["progressive", "consistency", "ect"]
TeacherSolver = Literal["ddim", "dpm-solver"]
MIN_EVAL_SAMPLES = 10  # fewer cannot estimate a covariance or a k-NN radius (k = 3)
DatasetName = Literal[DATASETS]
LogBackend = Literal["files", "tensorboard"]


def default_device() -> str:
    """'cuda' when a CUDA device is usable, else 'cpu' (evaluated when a Config is built)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Config:
    # --- data ---
    DATASET: DatasetName = "mnist"  # what to learn: mnist (shipped), fashion-mnist, or folder (your images in --data-dir DIR/<class>/)
    DATA_DIR: str = ""  # where the data is ('' = the repo's data/ folder; for folder: DIR/<class>/*.png)
    BATCH_SIZE: int = 128  # images per optimizer step
    IMAGE_SIZE: int = 28  # side of the (square) images (a folder's images are resized to it)
    CHANNELS: int = 1  # image channels: 1 greyscale, 3 colour (a folder dataset's choice)
    TRAIN_SIZE: int = 0  # train on the first N images only (0 = all; for quick trials)
    DOWNLOAD: bool = True  # try torchvision's download when the files are missing
    LOADER: Literal["memory", "dataloader"] = "memory"  # batches from a device tensor, or torchvision's DataLoader
    NUM_WORKERS: int = 0  # DataLoader worker processes (with --loader dataloader)

    # --- model (UNet) ---
    MODEL_CHANNELS: int = 64  # UNet width at full resolution
    CHANNEL_MULT: tuple = (1, 2, 2)  # width multipliers per resolution (28, 14, 7)
    PATCH_SIZE: int = 1  # fold PxP pixels into channels first (2: the UNet runs at 14 -> 7)
    NUM_RES_BLOCKS: int = 2  # residual blocks per resolution on the way down
    TIME_EMBED_DIM: int = 256  # width of the timestep embedding
    ATTENTION: bool = True  # self-attention at the lowest resolution
    DROPOUT: float = 0.0  # dropout inside residual blocks
    CONDITIONAL: bool = False  # learn the images' classes too (a class embedding), for --digit/--class and --guidance; the CPU preset turns it on
    CLASS_DROPOUT: float = 0.1  # share of each batch trained without its label (the "no class" token)
    CLUSTERS: int = 0  # without labels (--no-conditional): learn K k-means clusters of the training images as classes instead (Bao et al. 2022); sampling draws them in proportion to their sizes; 0 = none

    # --- diffusion ---
    TIMESTEPS: int = 1000  # diffusion steps T (timesteps are 0-indexed: 0 .. T-1)
    BETA_START: float = 1e-4  # first beta of the linear schedule
    BETA_END: float = 0.02  # last beta of the linear schedule
    SCHEDULE_TYPE: Schedule = "linear"  # noise schedule: linear (DDPM) or cosine (improved DDPM)
    PREDICTION: Prediction = "eps"  # what the network predicts: noise (eps), velocity (v), or EDM's preconditioned F (edm)
    LOSS_WEIGHTING: LossWeighting = "none"  # per-timestep loss weights: none, min-snr (gamma 5) or sigmoid (Kingma & Gao, b = 2)
    TIMESTEP_SAMPLING: TimestepSampling = "uniform"  # training timesteps: uniform in t, or lognormal in sigma (EDM)

    # --- training ---
    EPOCHS: int = 100  # passes over the training set
    LEARNING_RATE: float = 1e-4  # AdamW learning rate at BATCH_SIZE 128 (scaled by sqrt(batch/128))
    LR_WARMUP_STEPS: int = 500  # linear learning-rate warm-up, in optimizer steps
    LR_SCHEDULE: LRSchedule = "constant"  # decay over the run's budget (steps, epochs or minutes; a progressive distillation's: each round) to LR_FLOOR at its end
    LR_FLOOR: float = 0.0  # the learning rate at the end of a decaying schedule, as a fraction of the peak
    WEIGHT_DECAY: float = 0.0  # AdamW weight decay
    GRAD_CLIP: float = 1.0  # clip the gradient norm to this (0 = off)
    EMA_DECAY: float = 0.9995  # decay of the weight average used for sampling (--ema-rule constant)
    EMA_WARMUP: bool = True  # use decay min(EMA_DECAY, (1+step)/(10+step)) early in training
    EMA_RULE: EMARule = "constant"  # constant: EMA_DECAY; power: EDM2's average over the last EMA_STD of the run
    EMA_STD: float = 0.05  # width of the power EMA: std of its weights' ages as a fraction of the steps so far
    GUIDE_AT: float = 0.125  # keep the EMA weights at this fraction of the budget as the autoguidance guide (0 = none)
    GUIDE_EMA_STD: float = 0.0  # the guide's own power EMA until GUIDE_AT, of this width (like --ema-std; Karras et al. 2024 tune it apart); 0 = the model's EMA
    MAX_STEPS: int = 0  # stop after this many optimizer steps in total (0 = no limit)
    MAX_MINUTES: float = 0.0  # stop after this many minutes of training in total (0 = no limit)
    SEED: int = 0  # seeds weights, data order, noise and samples
    DEVICE: str = field(default_factory=default_device)  # cuda if available, else cpu
    PRECISION: Precision = "auto"  # training autocast dtype: auto = bf16 on cuda and on CPUs with AVX-512 BF16 or AMX, else fp32
    CHANNELS_LAST: bool = False  # channels_last memory format for the UNet (GPU)
    COMPILE: bool = False  # torch.compile the UNet for training
    THREADS: int = 0  # CPU threads for torch (0 = the cores no other program keeps busy: all on an idle machine)
    MAX_BAD_STEPS: int = 10  # stop after this many non-finite losses or gradients in a row
    LOG: LogBackend = "files"  # files: console, CSV and plots; tensorboard: those and event files in <run>/tb (tensorboard --logdir runs)

    # --- outputs ---
    CHECKPOINT_DIR: str = ""  # where checkpoints are written ('' = a new folder under runs/)
    OUTPUT_DIR: str = ""  # where sample grids, loss history and plots go ('' = the checkpoint folder)
    SAVE_EVERY: int = 10  # write a checkpoint and a sample grid every this many epochs
    SAVE_EVERY_STEPS: int = 0  # also refresh latest.pt every this many steps (0 = off)
    KEEP: int = 3  # periodic checkpoints kept besides latest.pt
    NUM_SAMPLES: int = 100  # images in each sample grid (conditional: rounded up to the same number of each class, one row per class)
    PRINT_EVERY: int = 100  # update the progress bar's loss every this many steps
    EVAL_EVERY: int = 0  # evaluate FID every this many epochs (0 = off)
    EVAL_SAMPLES: int = 1000  # samples per evaluation during training

    # --- sampling ---
    SAMPLER: Sampler = "dpm-solver"  # sampler for grids and evaluation (dpm-solver is DPM-Solver++(2M), dpm-solver-3m its third-order form)
    SAMPLING_STEPS: int = 20  # network evaluations per sample (ddpm always uses TIMESTEPS)
    ETA: float = 0.0  # sampler noise: 0 = deterministic; 1 = ancestral (ddim), the SDE (dpm-solver)
    SPACING: Spacing = "auto"  # sampling timesteps: auto = logsnr for dpm-solver, time for ddim; trailing = T(1 - k/steps) - 1 (Lin et al.); tuned = those scripts/tune_steps.py found
    TUNED_TIMESTEPS: tuple = ()  # the timesteps of --spacing tuned, from T-1 down (recorded by scripts/tune_steps.py)
    AUTOGUIDANCE: float = 1.0  # autoguidance A: guide + A (model - guide), the guide the GUIDE_AT snapshot; 1 = off
    GUIDANCE_INTERVAL: tuple = ()  # guide (both kinds) only at noise levels LO < sigma <= HI (Kynkaanniemi et al. 2024; sigma = sqrt((1 - abar) / abar)); none (or 0 inf): at every level
    GUIDANCE: float = 1.0  # classifier-free guidance W: eps_u + W (eps_c - eps_u); 0 = unconditional, 1 = plain conditional (the best FID: docs/evaluation.md)

    # --- distillation ---
    DISTILL: str = ""  # a trained checkpoint (or pretrained) to distil into a student that samples in STUDENT_STEPS steps ('' = train on data)
    DISTILL_METHOD: DistillMethod = "progressive"  # progressive (Salimans & Ho 2022), consistency (Song et al. 2023) or ect, easy consistency tuning (Geng et al. 2024)
    STUDENT_STEPS: int = 4  # network evaluations per image of the distilled student
    TEACHER_STEPS: int = 16  # the teacher's deterministic steps (on the trailing grid, by --teacher-solver) the distillation starts from (not used by ect)
    DISTILL_ROUNDS: int = 0  # rounds of progressive distillation, each dividing the steps by the same power of 2 (0 = the fewest in which a student step spans at most 4 teacher steps: 16 -> 4 in one, 16 -> 4 -> 1 in two; Salimans & Ho halve in each)
    TEACHER_SOLVER: TeacherSolver = "dpm-solver"  # the first round's teacher path: dpm-solver (DPM-Solver++(2M) within each student step, the more accurate) or ddim (Salimans & Ho's)
    DISTRIBUTION_MATCHING: float = 0.0  # weight of the distribution-matching loss (Yin et al. 2024, DMD) on the last step of progressive distillation's last round, beside its regression (0 = off)
    TEACHER_GUIDANCE: float = 1.0  # the guidance W of the teacher's outputs a student learned (baked in: it samples at --guidance 1)

    # --- provenance ---
    PRESET: Preset = "none"  # the preset this run started from (set by --preset; none = the defaults)
    CLASS_NAMES: tuple = ()  # the dataset's classes, recorded when a run starts (a folder's subfolders)
    CLUSTER_SIZES: tuple = ()  # the training images in each of the CLUSTERS clusters, recorded when a run starts
    DATA_FINGERPRINT: str = ""  # the dataset's content hash, recorded when a run starts

    @classmethod
    def from_preset(cls, preset: str = "auto", **overrides) -> "Config":
        """A preset's settings with `overrides` (Config fields) on top; explicit values win.

        'auto' is 'cpu' when the run's device (overrides' DEVICE, else the default) is the
        CPU and 'none' (the defaults) otherwise. A step or epoch budget among the overrides
        replaces the preset's time limit, unless MAX_MINUTES is given too; a model that learns
        no classes (CONDITIONAL False) gets the preset's WITHOUT_CLASSES settings (and so does
        one given CLUSTERS without CONDITIONAL: the clusters take the labels' place), one
        without clusters either (CLUSTERS 0) its WITHOUT_CLUSTERS settings on top; one that
        learns its dataset's labels the preset's WITH_LABELS_OF settings for that dataset.
        """
        if overrides.get("CLUSTERS") and "CONDITIONAL" not in overrides:
            overrides = {**overrides, "CONDITIONAL": False}  # clusters stand in for the labels
        name = resolve_preset(preset, overrides.get("DEVICE"))
        if name not in PRESETS:
            raise ConfigError(f"unknown --preset {preset!r}; expected one of auto, "
                              f"{', '.join(PRESETS)}")
        settings = dict(PRESETS[name])
        if not overrides.get("CONDITIONAL", settings.get("CONDITIONAL", cls.CONDITIONAL)):
            settings.update(WITHOUT_CLASSES.get(name, {}))
            if not overrides.get("CLUSTERS", settings.get("CLUSTERS", cls.CLUSTERS)):
                settings.update(WITHOUT_CLUSTERS.get(name, {}))
        else:
            dataset = overrides.get("DATASET", settings.get("DATASET", cls.DATASET))
            settings.update(WITH_LABELS_OF.get(name, {}).get(dataset, {}))
        if ("EPOCHS" in overrides or "MAX_STEPS" in overrides) and "MAX_MINUTES" not in overrides:
            settings.pop("MAX_MINUTES", None)
        return cls(**{**settings, **overrides, "PRESET": name})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The dataset's classes: recorded at the run's start, else the dataset's fixed ones."""
        return tuple(self.CLASS_NAMES) or builtin_classes(self.DATASET) or ()

    @property
    def num_classes(self) -> int:
        """Classes the network learns: the dataset's if CONDITIONAL, else its CLUSTERS
        (0 for none)."""
        return len(self.class_names) if self.CONDITIONAL else self.CLUSTERS

    def to_dict(self) -> dict:
        """Plain values only (str, int, float, bool, tuple), safe for weights_only loading."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """Rebuild a Config from `to_dict` output; keys this version lacks are ignored.
        DATA_DIR './data' was the default of earlier versions (the working folder's data/):
        it reads as '' (the repo's data/), so their checkpoints work from any folder."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
        if kept.get("DATA_DIR") == "./data":
            kept["DATA_DIR"] = ""
        if kept.get("DISTILL") and "TEACHER_SOLVER" not in kept:
            # distilled before rounds and solver were settings: halving rounds, DDIM's path
            ratio = max(1, kept.get("TEACHER_STEPS", 16) // max(1, kept.get("STUDENT_STEPS", 4)))
            kept.update(TEACHER_SOLVER="ddim", DISTILL_ROUNDS=max(1, ratio.bit_length() - 1)
                        if kept.get("DISTILL_METHOD", "progressive") == "progressive" else 0)
        if kept.get("DISTILL") and "TEACHER_GUIDANCE" not in kept:
            # a student saved before TEACHER_GUIDANCE was recorded: its GUIDANCE was baked
            # into its targets, and it was trained on the trailing grid of that time
            kept.update(TEACHER_GUIDANCE=kept.get("GUIDANCE", 1.0), GUIDANCE=1.0)
            if kept.get("SPACING") == "trailing":
                kept["SPACING"] = "trailing-v1"
        return cls(**kept)

    def validate(self) -> "Config":
        """Raise ConfigError naming the flag for the first setting that cannot work."""
        self._check_distillation()
        self._check_numbers()
        self._check_data()
        self._check_ranges()
        self._check_model()
        return self

    def _check_numbers(self) -> None:
        """Finite, positive and non-negative where a setting must be."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag_for(f.name)} must be a finite number, got {value}")
        positive = ["PATCH_SIZE", "EPOCHS", "BATCH_SIZE", "LEARNING_RATE", "TIMESTEPS", "MODEL_CHANNELS",
                    "TIME_EMBED_DIM", "NUM_RES_BLOCKS", "SAVE_EVERY", "NUM_SAMPLES",
                    "PRINT_EVERY", "SAMPLING_STEPS", "EVAL_SAMPLES", "MAX_BAD_STEPS", "IMAGE_SIZE",
                    "CHANNELS"]
        for name in positive:
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{flag_for(name)} must be positive, got {value}")
        non_negative = ["LR_FLOOR", "NUM_WORKERS", "TRAIN_SIZE", "MAX_STEPS", "MAX_MINUTES", "SAVE_EVERY_STEPS", "KEEP", "EVAL_EVERY", "THREADS",
                        "LR_WARMUP_STEPS", "WEIGHT_DECAY", "GRAD_CLIP", "DROPOUT", "ETA"]
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"{flag_for(name)} must be >= 0, got {value}")

    def _check_data(self) -> None:
        """The dataset, its image shape, and what a batch and an evaluation need."""
        if self.EVAL_EVERY and self.EVAL_SAMPLES < MIN_EVAL_SAMPLES:
            raise ConfigError(f"--eval-samples must be at least {MIN_EVAL_SAMPLES} (FID needs a "
                              f"covariance; 1,000 is the default), got {self.EVAL_SAMPLES}")
        if not 0 <= self.SEED < 2 ** 63:
            raise ConfigError(f"--seed must lie in [0, 2^63), got {self.SEED}")
        if self.DATASET != "folder" and (self.CHANNELS, self.IMAGE_SIZE) != (1, 28):
            raise ConfigError(f"--dataset {self.DATASET} has 28x28 greyscale images: --channels 1 "
                              f"and --image-size 28 (other values are for --dataset folder), got "
                              f"--channels {self.CHANNELS} --image-size {self.IMAGE_SIZE}")
        if self.CHANNELS not in (1, 3):
            raise ConfigError(f"--channels must be 1 (greyscale) or 3 (colour), got {self.CHANNELS}")
        if self.DATASET == "folder" and not self.DATA_DIR:
            raise ConfigError("--dataset folder needs --data-dir DIR (your images in "
                              "DIR/<class name>/*.png)")
        available = builtin_train_size(self.DATASET)
        if available and self.BATCH_SIZE > (self.TRAIN_SIZE or available):
            raise ConfigError(f"--batch-size {self.BATCH_SIZE} exceeds the "
                              f"{self.TRAIN_SIZE or available:,} training images")

    def _check_ranges(self) -> None:
        """Settings that must lie in an interval."""
        if not 0 < self.BETA_START < 1:
            raise ConfigError(f"--beta-start must lie in (0, 1), got {self.BETA_START}")
        if not 0 < self.BETA_END < 1:
            raise ConfigError(f"--beta-end must lie in (0, 1), got {self.BETA_END}")
        if self.BETA_START >= self.BETA_END:
            raise ConfigError(f"--beta-start ({self.BETA_START}) must be smaller than "
                              f"--beta-end ({self.BETA_END})")
        if not 0 <= self.EMA_DECAY < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.EMA_DECAY}")
        if self.LR_FLOOR > 1:
            raise ConfigError(f"--lr-floor is a fraction of the peak learning rate: [0, 1], "
                              f"got {self.LR_FLOOR}")
        if not 0 < self.EMA_STD < 0.28:
            raise ConfigError(f"--ema-std must lie in (0, 0.28) (0.28 is a plain average of "
                              f"the whole run), got {self.EMA_STD}")
        if not 0 <= self.CLASS_DROPOUT < 1:
            raise ConfigError(f"--class-dropout must lie in [0, 1), got {self.CLASS_DROPOUT}")
        if not 0 <= self.GUIDE_AT < 1:
            raise ConfigError(f"--guide-at is a fraction of the budget: [0, 1), got {self.GUIDE_AT}")
        if not 0 <= self.GUIDE_EMA_STD < 0.28:
            raise ConfigError(f"--guide-ema-std must lie in [0, 0.28) (0: the guide is the model's "
                              f"own EMA), got {self.GUIDE_EMA_STD}")
        if self.AUTOGUIDANCE < 0:
            raise ConfigError(f"--autoguidance must be >= 0 (1 = off, 0 = the guide alone), "
                              f"got {self.AUTOGUIDANCE}")
        if problem := interval_problem(self.GUIDANCE_INTERVAL):
            raise ConfigError(problem)
        if self.GUIDANCE < 0:
            raise ConfigError(f"--guidance must be >= 0 (0 = unconditional, 1 = conditional), "
                              f"got {self.GUIDANCE}")
        if self.PREDICTION == "edm" and self.LOSS_WEIGHTING != "none":
            raise ConfigError(f"--prediction edm carries EDM's own loss weight; --loss-weighting "
                              f"{self.LOSS_WEIGHTING} is for eps or v (use none)")
        if self.DROPOUT >= 1:
            raise ConfigError(f"--dropout must lie in [0, 1), got {self.DROPOUT}")
        if self.SAMPLING_STEPS > self.TIMESTEPS:
            raise ConfigError(f"--sampling-steps ({self.SAMPLING_STEPS}) cannot exceed "
                              f"--timesteps ({self.TIMESTEPS})")
        tuned = self.TUNED_TIMESTEPS
        if tuned and (tuned[0] != self.TIMESTEPS - 1 or tuned[-1] < 0
                      or any(a <= b for a, b in zip(tuned, tuned[1:]))):
            raise ConfigError(f"the tuned timesteps {' '.join(map(str, tuned))} are not "
                              f"decreasing from {self.TIMESTEPS - 1} down to 0 or above")

    def _check_distillation(self) -> None:
        """A student's steps (first: they also become its --sampling-steps)."""
        if not self.DISTILL:
            return
        if self.DISTILL_METHOD == "ect" and not 1 <= self.STUDENT_STEPS <= self.TIMESTEPS:
            raise ConfigError(f"--student-steps ({self.STUDENT_STEPS}) must lie in 1 .. "
                              f"--timesteps ({self.TIMESTEPS})")
        if self.DISTILL_METHOD != "ect" and not (
                1 <= self.STUDENT_STEPS <= self.TEACHER_STEPS <= self.TIMESTEPS):
            raise ConfigError(f"--student-steps ({self.STUDENT_STEPS}) and --teacher-steps "
                              f"({self.TEACHER_STEPS}) need 1 <= student <= teacher <= "
                              f"--timesteps ({self.TIMESTEPS})")
        if not (math.isfinite(self.DISTRIBUTION_MATCHING) and self.DISTRIBUTION_MATCHING >= 0):
            raise ConfigError(f"--distribution-matching {self.DISTRIBUTION_MATCHING} must be a "
                              f"weight >= 0 (0 = off)")
        ratio = self.TEACHER_STEPS // self.STUDENT_STEPS
        if self.DISTILL_METHOD != "progressive":
            for name, value, default in (("DISTILL_ROUNDS", self.DISTILL_ROUNDS, 0),
                                         ("TEACHER_SOLVER", self.TEACHER_SOLVER, "dpm-solver"),
                                         ("DISTRIBUTION_MATCHING", self.DISTRIBUTION_MATCHING, 0)):
                if value != default:
                    raise ConfigError(f"{flag_for(name)} {value} is a setting of progressive "
                                      f"distillation, not of --distill-method "
                                      f"{self.DISTILL_METHOD}")
            return
        if ratio < 2 or ratio * self.STUDENT_STEPS != self.TEACHER_STEPS or ratio & (ratio - 1):
            raise ConfigError(f"progressive distillation halves the steps each round: "
                              f"--teacher-steps ({self.TEACHER_STEPS}) must be --student-steps "
                              f"({self.STUDENT_STEPS}) times a power of 2 (2, 4, 8, ...), "
                              f"e.g. --teacher-steps {2 * self.STUDENT_STEPS}")
        halvings = ratio.bit_length() - 1
        if self.DISTILL_ROUNDS < 0 or (self.DISTILL_ROUNDS and halvings % self.DISTILL_ROUNDS):
            choices = ", ".join(str(k) for k in range(1, halvings + 1) if halvings % k == 0)
            raise ConfigError(f"--distill-rounds {self.DISTILL_ROUNDS}: from --teacher-steps "
                              f"{self.TEACHER_STEPS} to --student-steps {self.STUDENT_STEPS} the "
                              f"steps halve {halvings} time(s), which every round must share "
                              f"equally: give {choices} (or 0: the fewest rounds in which a "
                              f"student step spans at most 4 teacher steps)")

    def _check_model(self) -> None:
        """The UNet's shape against the image's, the closed sets, the device."""
        if not self.CHANNEL_MULT or any(m <= 0 for m in self.CHANNEL_MULT):
            raise ConfigError(f"--channel-mult needs positive integers, got {self.CHANNEL_MULT}")
        if self.IMAGE_SIZE % self.PATCH_SIZE:
            raise ConfigError(f"--patch-size {self.PATCH_SIZE} does not divide --image-size "
                              f"{self.IMAGE_SIZE}")
        side = self.IMAGE_SIZE // self.PATCH_SIZE
        if side % 2 ** (len(self.CHANNEL_MULT) - 1):
            raise ConfigError(f"--channel-mult has {len(self.CHANNEL_MULT)} resolutions, so "
                              f"{len(self.CHANNEL_MULT) - 1} halvings, which a {side}x{side} "
                              f"input (image size / patch size) does not allow")
        if self.CLUSTERS and self.CONDITIONAL:
            raise ConfigError(f"--clusters {self.CLUSTERS} replaces the dataset's classes with "
                              f"clusters of its images: add --no-conditional (or drop --clusters "
                              f"to learn the classes)")
        if self.CLUSTERS < 0 or self.CLUSTERS == 1:
            raise ConfigError(f"--clusters must be 0 (none) or at least 2, got {self.CLUSTERS}")
        for name, hint in get_type_hints(type(self)).items():
            if get_origin(hint) is Literal and getattr(self, name) not in get_args(hint):
                raise ConfigError(f"unknown {flag_for(name)} {getattr(self, name)!r}; "
                                  f"expected one of {', '.join(get_args(hint))}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.DEVICE):
            raise ConfigError(f"--device must be cpu or cuda[:N], got {self.DEVICE!r}")


# Settings that may differ when a run is resumed: they steer the run, not what is learned.
RUN_CONTROL = {"EPOCHS", "MAX_STEPS", "MAX_MINUTES", "DEVICE", "LOADER", "NUM_WORKERS", "THREADS", "CHECKPOINT_DIR", "OUTPUT_DIR",
               "DATA_DIR", "DOWNLOAD", "SAVE_EVERY", "SAVE_EVERY_STEPS", "KEEP", "NUM_SAMPLES",
               "PRINT_EVERY", "EVAL_EVERY", "EVAL_SAMPLES", "SAMPLER", "SAMPLING_STEPS",
               "ETA", "SPACING", "GUIDANCE", "AUTOGUIDANCE", "GUIDE_AT", "MAX_BAD_STEPS", "COMPILE", "PRESET", "LOG"}


def config_for_resume(saved: Config, requested: dict) -> Config:
    """The saved run's config with the explicitly requested run-control settings applied.

    Anything else that differs from the checkpoint is a mismatch: ConfigError.
    """
    for name, value in requested.items():
        if name not in RUN_CONTROL and getattr(saved, name) != value:
            raise ConfigError(f"{flag_for(name)} {value} does not match the checkpoint "
                              f"({getattr(saved, name)}); drop the flag to continue that run")
    return saved.replace(**{k: v for k, v in requested.items() if k in RUN_CONTROL})

# Named groups of settings for common machines; explicit flags still win.
PRESETS = {
    "none": {},  # the defaults above: the 3.3M-parameter model, for a GPU
    # A small model for a 2-core CPU: digits in 15 minutes (docs/training.md).
    # Each choice was measured against the alternatives there (runs of equal wall-clock time).
    "cpu": dict(MODEL_CHANNELS=16, CHANNEL_MULT=(1, 2, 4), NUM_RES_BLOCKS=1, TIME_EMBED_DIM=64,
                ATTENTION=False, DROPOUT=0.0, PREDICTION="v", BATCH_SIZE=32, LEARNING_RATE=4e-3,
                LR_WARMUP_STEPS=200, EMA_DECAY=0.9995, DEVICE="cpu", EPOCHS=100, MAX_MINUTES=15.0,
                SAVE_EVERY=1, ETA=1.0,  # SDE sampling: FID 25 vs 34 (ODE) at 20 steps, docs/sampling.md
                # decay to 0 over the budget + power EMA: FID 45.9 vs 51.8 at 8,000 steps (docs/training.md)
                LR_SCHEDULE="linear", EMA_RULE="power", EMA_STD=0.05,
                # trained with the digits' labels (grids of 0-9, --digit): FID 5.8 against
                # 34.6 without them in 15 minutes (docs/training.md); --no-conditional --clusters 0 for the latter
                CONDITIONAL=True,
                # autoguidance from the run's own EMA at 1/8 of the budget (GUIDE_AT): FID 13.75
                # -> 7.16 on Fashion-MNIST at 12,250 steps, 5.86 -> 5.47 on MNIST (docs/sampling.md)
                AUTOGUIDANCE=1.25,
                # the guide a longer power EMA of its own (std 0.18, the model's 0.05): FID 4.08
                # -> 3.56 on Fashion-MNIST at 17,600 steps, MNIST with labels unchanged
                # (6.91 -> 6.86 on 2,000 samples; docs/sampling.md#the-guides-ema); not
                # without labels or clusters (WITHOUT_CLUSTERS)
                GUIDE_EMA_STD=0.18),
}

# What a preset changes for a model that learns no classes of the dataset (--no-conditional):
# it learns 100 k-means clusters of the images as its classes instead (Bao et al. 2022),
# sampled with the preset's autoguidance A = 1.25: FID 5.51 against 13.91 for the design's
# model at its best guidance (12,250 steps, 10,000 samples; docs/results.md#clusters-as-classes).
WITHOUT_CLASSES = {"cpu": dict(CLUSTERS=100)}
# ... and for one without clusters either (--no-conditional --clusters 0, the design's
# unconditional DDPM): a stronger autoguidance, A = 2, from the run's own snapshot at
# GUIDE_AT (1/8 of the budget): FID 37.3 -> 14.7 on unconditional MNIST at 12,250 steps,
# the best of the guides and scales measured; guided only at 0.28 < sigma <= 5.42 (EDM2's
# interval): 13.9, and a third faster to sample (docs/sampling.md#autoguidance).
# Its guide is the model's own EMA at GUIDE_AT (GUIDE_EMA_STD 0): the guide's own longer
# EMA, the preset's with classes or clusters, did not help it (FID 14.19 -> 14.52 on 2,000
# samples at 12,250 steps, where clusters gained 7.67 -> 7.08; docs/sampling.md#the-guides-ema).
WITHOUT_CLUSTERS = {"cpu": dict(AUTOGUIDANCE=2.0, GUIDANCE_INTERVAL=(0.28, 5.42), GUIDE_EMA_STD=0.0)}
# ... and for a dataset whose labels it learns, where that dataset's best differs from
# MNIST's: Fashion-MNIST samples with A = 1.5 inside 0.28 < sigma <= 5.42, better than
# A = 1.25 everywhere on both runs measured (10,000 samples: 5.40 -> 4.60 at 12,250 steps,
# 6.66 -> 5.35 in 15 minutes; docs/results.md), where MNIST with labels keeps A = 1.25
# everywhere (5.47 against 5.81, 2,000 samples of the pretrained model; docs/sampling.md).
# Its textures also want 40 sampling steps, not 20: 5.35 -> 4.74 in 15 minutes, 3.31 -> 2.80
# in 60 (10,000 samples; docs/sampling.md), where MNIST does not gain: 4.15 -> 4.11 with
# its labels (22,110 steps; the digit asked for 97.9% -> 97.0%), 16.4 -> 17.1 without.
# With the guide's own EMA, a lower edge of 0.1 instead of 0.28 gains again (the 15-minute
# run 3.71 -> 3.42 at 0.15 -> 3.37 at 0.1; 2.49 -> 2.46 at 60 minutes from 0.15), and
# eta 0.75 ties eta 1 (docs/sampling.md#fashion-mnist-the-interval-and-eta).
WITH_LABELS_OF = {"cpu": {"fashion-mnist": dict(AUTOGUIDANCE=1.5, GUIDANCE_INTERVAL=(0.1, 5.42),
                                                SAMPLING_STEPS=40)}}

# Tuple fields given as two floats (the others are integers).
FLOAT_PAIRS = {"GUIDANCE_INTERVAL": ("LO", "HI")}
# Flags whose name is not simply the field's name in kebab case.
FLAG_NAMES = {"LEARNING_RATE": "--lr", "SCHEDULE_TYPE": "--schedule"}
# Second spellings: torchrun's own parser refuses `--log` after the script (an ambiguous
# start of its --log-dir and --logs-specs), so under torchrun it is spelled --logger.
FLAG_ALIASES = {"LOG": ("--logger",)}
# Fields that are recorded, not asked for: no flag.
NOT_FLAGS = {"PRESET", "CLASS_NAMES", "CLUSTER_SIZES", "DATA_FINGERPRINT", "TUNED_TIMESTEPS",
             "TEACHER_GUIDANCE"}
# The flags most runs need, shown first in --help.
COMMON = ("EPOCHS", "MAX_MINUTES", "MAX_STEPS", "BATCH_SIZE", "LEARNING_RATE", "CONDITIONAL",
          "DATASET", "DATA_DIR", "DEVICE", "SEED", "LOG")


def flag_for(name: str) -> str:
    """Command-line flag of a Config field: BATCH_SIZE -> --batch-size."""
    return FLAG_NAMES.get(name, "--" + name.lower().replace("_", "-"))


# Where a run writes and runs: not part of the command that trains its model again.
RUN_LOCAL = {"CHECKPOINT_DIR", "OUTPUT_DIR", "DEVICE"}


def training_command(config: Config) -> str:
    """The `python main.py` command that trains `config` again: its preset, then the flags of
    the settings that differ from what that preset gives (each flag only where it is needed;
    folders and the device left out, and the data folder for the built-in datasets)."""
    local = RUN_LOCAL | ({"DATA_DIR"} if config.DATASET != "folder" else set())
    names = [f.name for f in dataclasses.fields(Config) if f.name not in NOT_FLAGS | local]
    start = {"DEVICE": config.DEVICE}

    def differs(given: dict) -> bool:
        made = Config.from_preset(config.PRESET, **start, **given)
        return any(getattr(made, name) != getattr(config, name) for name in names)

    given = {name: getattr(config, name) for name in names
             if getattr(Config.from_preset(config.PRESET, **start), name) != getattr(config, name)}
    made = Config.from_preset(config.PRESET, **start, **given)  # e.g. --no-conditional's own
    given.update({name: getattr(config, name) for name in names  # defaults, and a flag that
                  if getattr(made, name) != getattr(config, name)})  # undoes one
    for name in reversed(list(given)):  # e.g. --max-minutes 0 is implied by --max-steps N,
        # --clusters 100 by --no-conditional (the later field goes first)
        value = given.pop(name)
        if differs(given):
            given[name] = value
    flags = []
    for name, value in given.items():
        if isinstance(value, bool):
            flags.append(flag_for(name) if value else "--no-" + flag_for(name)[2:])
        else:
            flags += [flag_for(name), *map(str, value)] if isinstance(value, tuple) else \
                [flag_for(name), shlex.quote(str(value))]
    return " ".join(["python main.py", "--preset", config.PRESET, *flags])


def _source_lines() -> list[str]:
    try:
        return inspect.getsource(Config).splitlines()
    except (OSError, TypeError):
        return []


def field_help() -> dict:
    """The one-line comment after each field above, used as its --help text."""
    pattern = re.compile(r"^\s+([A-Z_]+):[^#]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for m in map(pattern.match, _source_lines()) if m}


def field_sections() -> dict:
    """Each field's section, from the `# --- name ---` comments above it."""
    sections, current = {}, "settings"
    for line in _source_lines():
        header = re.match(r"^\s+# --- (.+) ---", line)
        if header:
            current = header.group(1)
        field_match = re.match(r"^\s+([A-Z_]+):", line)
        if field_match:
            sections[field_match.group(1)] = current
    return sections


# ----- command-line flags, derived from the fields above -----
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line with a pointer to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: python {self.prog} --help)\n")


def _shown_default(name: str, defaults: dict, preset_values: dict, preset: str) -> str:
    """What --help says a field defaults to: the value this machine's run will use."""
    if name in preset_values and preset_values[name] != defaults.get(name):
        value = preset_values[name]
        return (f"{_text(value)} on this machine (--preset {preset}); "
                f"{_text(defaults[name])} with --preset none")
    return _text(defaults[name]) if name in defaults else ""


def interval_problem(interval) -> str | None:
    """What is wrong with a --guidance-interval (LO, HI) (main.py's and generate.py's),
    or None; empty means every noise level."""
    if interval and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
        return (f"--guidance-interval LO HI needs 0 <= LO < HI (noise levels sigma; 0 inf = "
                f"everywhere), got {_text(tuple(interval))}")
    return None


def _text(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "''" if value == "" else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, names=None, rename: dict | None = None,
                         default_note: dict | None = None, help_text: dict | None = None,
                         preset: str | None = None, groups: bool = False):
    """Add a flag for each Config field in `names` (all flags if None), typed from its
    annotation, with its comment as help. Defaults are None, so `config_overrides` sees only
    what was given. default_note replaces the shown default of some fields (e.g. "the
    checkpoint's"), help_text the comment (for a script that uses the setting differently).
    preset: show the defaults a run on this machine takes from that preset ('auto' resolves
    by the device). groups: the common flags first, then one group per config section."""
    rename = rename or {}
    helps = {**field_help(), **(help_text or {})}
    hints = get_type_hints(Config)
    defaults = {**_defaults(), "DEVICE": f"{default_device()} on this machine (cuda when available)"}
    chosen = resolve_preset(preset) if preset else "none"
    preset_values = {k: v for k, v in PRESETS.get(chosen, {}).items() if k != "DEVICE"} \
        if preset else {}
    sections = field_sections()
    names = [f.name for f in dataclasses.fields(Config)
             if (names is None and f.name not in NOT_FLAGS) or (names is not None and f.name in names)]
    if groups:
        names.sort(key=lambda n: (n not in COMMON, COMMON.index(n) if n in COMMON else 0))
    group_of = {}
    for name in names:
        target = parser
        if groups:
            title = "common settings" if name in COMMON else sections.get(name, "settings")
            if title not in group_of:
                group_of[title] = parser.add_argument_group(title)
            target = group_of[title]
        hint = hints[name]
        text = helps.get(name, "")
        shown = (default_note or {}).get(name) or _shown_default(name, defaults, preset_values,
                                                                 chosen)
        if shown:
            text += f" (default: {shown})"
        kwargs = dict(dest=name, default=None, help=text.replace("%", "%%"))
        if get_origin(hint) is Literal:
            kwargs.update(choices=get_args(hint), metavar="{" + ",".join(get_args(hint)) + "}")
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif name in FLOAT_PAIRS:
            kwargs.update(type=float, nargs=2, metavar=FLOAT_PAIRS[name])
        elif hint is tuple:
            kwargs.update(type=int, nargs="+", metavar="M")
        else:
            kwargs.update(type=hint, metavar=name.split("_")[-1])
        target.add_argument(rename.get(name, flag_for(name)), *FLAG_ALIASES.get(name, ()),
                            **kwargs)


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields that were given on the command line, as {FIELD: value}."""
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
            if k in names and v is not None}


def _defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(Config)
            if f.default is not dataclasses.MISSING}


def resolve_preset(preset: str = "auto", device: str | None = None) -> str:
    """'auto' -> 'cpu' on a machine (or DEVICE) without CUDA, 'none' with it."""
    if preset != "auto":
        return preset
    return "cpu" if (device or default_device()) == "cpu" else "none"


def check_device(device: str, flag: str = "--device") -> str:
    """Fail with one line if a CUDA device is asked for and not available."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: CUDA is not available on this machine; "
                              f"use {flag} cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {device}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    return device


def check_writable(folder, flag: str) -> None:
    """Make sure a file can be written in `folder` (or, if it does not exist yet, could be
    created there), without leaving anything behind."""
    target = Path(folder)
    existing = next((p for p in [target, *target.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"{flag} {folder} cannot be written ({existing} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{flag} {folder} cannot be written ({error.strerror or error})") from None
