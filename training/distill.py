"""Distillation: a trained checkpoint (the teacher) taught to a student that samples in a
few steps, as a training run like any other (budget, exact resume, run folder, plan).

    python main.py --distill runs/NAME/latest.pt --student-steps 4            # progressive
    python main.py --distill runs/NAME/latest.pt --distill-method consistency --student-steps 2

Both start the student from the teacher's EMA weights, train on the real training images
(and their classes, for a conditional teacher), and write a normal checkpoint whose
config says how to sample it, so `generate.py --checkpoint` needs no flag.

- progressive (Salimans & Ho 2022, Algorithm 2): rounds that halve the steps, from
  TEACHER_STEPS down to STUDENT_STEPS, each an equal share of the budget; each round's
  student is kept beside the run's checkpoints (student_16steps.pt, ...). In a round of S
  student steps on the trailing grid t_k = (T-1)(1 - k/(2S)), one deterministic DDIM step
  of the student from t_2i to t_2i+2 is trained to land where two DDIM steps of the teacher
  land: the target x0 is the one that DDIM maps z_t onto the teacher's z_t'', and the loss
  is its squared error weighted by max(SNR, 1) ("truncated SNR"). At the end of a round
  the student becomes the teacher. The student samples with DDIM (eta 0, trailing).
- consistency (Song et al. 2023, consistency distillation): for adjacent points t > t' of
  the teacher's TEACHER_STEPS-point trailing grid (the last one: the clean data), the
  student's x0 prediction at x_t is trained to equal the target network's at x_t', the
  point one DDIM step of the teacher reaches from x_t. The target network is the
  student's EMA (EMA_DECAY): with the student itself as its target (Song & Dhariwal
  2023, who add other changes) a 15-minute run collapsed to one class (FID 870,
  docs/distillation.md). The student samples with the consistency sampler.

A student cannot be a teacher (its checkpoint says so): distil from the model it came from.
"""
from __future__ import annotations

import math

import torch

from config import RUN_CONTROL, Config, ConfigError, flag_for
from models import samplers
from models.diffusion import DiffusionModel
from training.trainer import Trainer
from utils import checkpoint as ckpt
from utils import distributed as dist
from utils.noise_scheduler import extract

# What a distillation run changes from its teacher's config unless the flags say otherwise.
DISTILL_DEFAULTS = dict(MAX_MINUTES=15.0, LEARNING_RATE=1e-3, LR_WARMUP_STEPS=0,
                        LR_SCHEDULE="constant", EMA_RULE="constant", EMA_DECAY=0.999,
                        EMA_WARMUP=True, CLASS_DROPOUT=0.0, EVAL_EVERY=0, EPOCHS=1000,
                        MAX_STEPS=0, CHECKPOINT_DIR="", OUTPUT_DIR="", TIMESTEP_SAMPLING="uniform")
# Settings of the distillation itself (beside run control) that the flags may set.
DISTILL_FIELDS = {"DISTILL", "DISTILL_METHOD", "STUDENT_STEPS", "TEACHER_STEPS", "LEARNING_RATE",
                  "LR_WARMUP_STEPS", "LR_SCHEDULE", "LR_FLOOR", "EMA_RULE", "EMA_DECAY",
                  "EMA_STD", "EMA_WARMUP", "BATCH_SIZE", "GRAD_CLIP", "WEIGHT_DECAY", "SEED",
                  "TRAIN_SIZE", "PRECISION", "CHANNELS_LAST"}


def student_sampling(method: str, steps: int) -> dict:
    """How the student samples: the grid it was trained on, without noise."""
    return dict(SAMPLER="ddim" if method == "progressive" else "consistency",
                SAMPLING_STEPS=steps, ETA=0.0, SPACING="trailing")


def distillation_config(teacher_path, requested: dict) -> Config:
    """The config of a distillation run of the checkpoint at `teacher_path`: the teacher's
    model, DISTILL_DEFAULTS, then the flags given (other settings that differ from the
    teacher's are refused: they would describe another model)."""
    state = ckpt.load_checkpoint(teacher_path)
    teacher = Config.from_dict(state["config"])
    if teacher.DISTILL:
        raise ConfigError(f"--distill {teacher_path} is itself a distilled student (of "
                          f"{teacher.DISTILL}); distil from the model it came from")
    for name, value in requested.items():
        if (name not in RUN_CONTROL and name not in DISTILL_FIELDS
                and getattr(teacher, name) != value):
            raise ConfigError(f"{flag_for(name)} {value} differs from the teacher's "
                              f"({getattr(teacher, name)}): a student has its teacher's model")
    method = requested.get("DISTILL_METHOD", "progressive")
    steps = requested.get("STUDENT_STEPS", Config.STUDENT_STEPS)
    # 15 minutes unless told otherwise; a step or epoch budget alone runs without a clock
    clockless = bool({"EPOCHS", "MAX_STEPS"} & set(requested)) and "MAX_MINUTES" not in requested
    settings = {**DISTILL_DEFAULTS, **({"MAX_MINUTES": 0.0} if clockless else {}),
                **student_sampling(method, steps), **requested, "DISTILL": str(teacher_path)}
    return teacher.replace(**settings).validate()


class Distiller(Trainer):
    """A Trainer whose loss is a teacher's (see the module's docstring); the rest (budget,
    checkpoints, resume, loggers) is the Trainer's."""

    def __init__(self, config: Config, resume: dict | None = None, **kwargs):
        if not config.DISTILL:
            raise ConfigError("a distillation run needs --distill CHECKPOINT")
        source = resume if resume is not None else ckpt.load_checkpoint(config.DISTILL)
        super().__init__(config, resume=resume, **kwargs)
        teacher_config = Config.from_dict(source["config"]).replace(DISTILL="")
        self.teacher = DiffusionModel.from_config(teacher_config).to(self.device)
        self.teacher.requires_grad_(False).eval()
        if resume is not None:
            self.teacher.load_state_dict(resume["teacher"])
        else:  # the student starts as the teacher (its EMA weights)
            weights = source["ema"]
            self.teacher.load_state_dict(weights)
            self.model.load_state_dict(weights)
            self.ema.load_state_dict(weights)
            self.round, self.round_start = 0, 0
        self.rounds = (int(math.log2(config.TEACHER_STEPS // config.STUDENT_STEPS))
                       if config.DISTILL_METHOD == "progressive" else 1)

    # ----- the schedule of rounds -----
    def _round_for(self, fraction: float) -> int:
        return min(self.rounds - 1, int(fraction * self.rounds))

    def student_steps(self) -> int:
        """The steps the student learns in the current round."""
        cfg = self.config
        if cfg.DISTILL_METHOD != "progressive":
            return cfg.STUDENT_STEPS
        return cfg.TEACHER_STEPS >> (self.round + 1)

    def _next_round_if_due(self) -> None:
        target = self._round_for(self._fraction)
        if target > self.round:  # the student becomes the teacher
            dist.wait_for_rank0(self._save_round)
            self.teacher.load_state_dict(self.ema.state_dict())
            self.round, self.round_start = target, self.step

    def _save_round(self) -> None:
        """The student of the round that ends, as a checkpoint of its own that samples
        with that round's steps: student_16steps.pt, student_8steps.pt, ..."""
        steps = self.student_steps()
        config = self.config.replace(SAMPLING_STEPS=steps).to_dict()
        weights = self.ema.state_dict()
        path = self.checkpoint_dir / f"student_{steps}steps.pt"
        ckpt.save_checkpoint({"config": config, "ema": weights, "model": weights,
                              "step": self.step, "epoch": self.epoch}, path)
        self.log(f"\nround {self.round + 1} done at step {self.step}: {path}")

    def ema_decay_at(self, step: int) -> float:
        """The EMA restarts with each round (its warm-up counts from the round's start)."""
        return super().ema_decay_at(step - getattr(self, "round_start", 0))

    # ----- the loss -----
    def per_image_loss(self, x0: torch.Tensor, labels: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        self._next_round_if_due()
        size = x0.shape[0]
        cfg = self.config
        progressive = cfg.DISTILL_METHOD == "progressive"
        # progressive: the teacher's grid of the round, two of its steps per student step;
        # consistency: adjacent points of the teacher's whole grid
        points = 2 * self.student_steps() if progressive else cfg.TEACHER_STEPS
        grid = torch.tensor(samplers.timestep_sequence(self.model.timesteps, points, "trailing")
                            + [-1], device=self.device)
        jump = 2 if progressive else 1
        index = jump * torch.randint(0, (len(grid) - 1) // jump, (size,), device=self.device,
                                     generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=self.generator)
        part = dist.local_slice(size)
        x0, index, noise = x0[part], index[part], noise[part]
        labels = None if labels is None or not cfg.CONDITIONAL else labels[part]
        t = grid[index]
        if progressive:
            per_image = self._progressive(x0, t, grid[index + 1], grid[index + 2], noise, labels)
        else:
            per_image = self._consistency(x0, t, grid[index + 1], noise, labels)
        return per_image, t

    def _teacher_ddim(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                      labels) -> torch.Tensor:
        """One deterministic DDIM step of the teacher, per-image timesteps; t_next = -1 is
        the clean data (the teacher's x0)."""
        teacher = self.teacher
        out = teacher.denoiser(self.precision, labels, teacher.config.GUIDANCE)(x, t).float()
        x0, eps = teacher.scheduler.split_model_output(x, t, out, teacher.prediction,
                                                       teacher.clip_x0)
        a_next = extract(teacher.scheduler.alphas_cumprod_padded, t_next + 1, x.shape)
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    def _student_x0(self, x0, t, noise, labels, grad: bool = True):
        """The student's x0 prediction at x_t = q(x_t | x0, noise), through the DDP wrapper
        (for the gradients) when `grad`."""
        scheduler = self.model.scheduler
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            output, _ = (self.forward or self.model)(x0, t, noise, labels)
        xt, _ = scheduler.add_noise(x0, t, noise)
        return scheduler.split_model_output(xt, t, output.float(), self.model.prediction,
                                            clip_x0=False)[0]

    def _progressive(self, x0, t, t_mid, t_end, noise, labels) -> torch.Tensor:
        scheduler = self.model.scheduler
        z_t, _ = scheduler.add_noise(x0, t, noise)
        with torch.no_grad():
            z_end = self._teacher_ddim(self._teacher_ddim(z_t, t, t_mid, labels), t_mid, t_end,
                                       labels)
            a_t = extract(scheduler.alphas_cumprod_padded, t + 1, x0.shape)
            a_end = extract(scheduler.alphas_cumprod_padded, t_end + 1, x0.shape)
            ratio = ((1 - a_end) / (1 - a_t)).sqrt()  # sigma_end / sigma_t
            target = (z_end - ratio * z_t) / (a_end.sqrt() - ratio * a_t.sqrt())
            weight = extract(scheduler.snr, t, x0.shape).clamp(min=1.0)[:, 0, 0, 0]
        prediction = self._student_x0(x0, t, noise, labels)
        return weight * (prediction - target).square().mean(dim=(1, 2, 3))

    def _consistency(self, x0, t, t_next, noise, labels) -> torch.Tensor:
        scheduler = self.model.scheduler
        x_t, _ = scheduler.add_noise(x0, t, noise)
        with torch.no_grad():
            x_next = self._teacher_ddim(x_t, t, t_next, labels)
            clean = t_next < 0
            target = x_next.clone()
            if (~clean).any():  # the target network's x0 prediction at the next point
                student = self.ema
                out = student.denoiser(self.precision, None if labels is None else
                                       labels[~clean])(x_next[~clean], t_next[~clean]).float()
                target[~clean] = scheduler.split_model_output(
                    x_next[~clean], t_next[~clean], out, student.prediction, clip_x0=False)[0]
        prediction = self._student_x0(x0, t, noise, labels)
        return (prediction - target).square().mean(dim=(1, 2, 3))

    # ----- what a checkpoint holds beyond the Trainer's -----
    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher.state_dict(),
                "round": self.round, "round_start": self.round_start}

    def load_state(self, state: dict):
        super().load_state(state)
        self.round = int(state.get("round", 0))
        self.round_start = int(state.get("round_start", 0))

    def estimate_step_seconds(self, repeats: int = 2) -> float:
        """A training step, plus the teacher's forward passes (two; consistency: the
        teacher's and the student's own), each about a third of a step."""
        return super().estimate_step_seconds(repeats) * (1 + 2 / 3)


__all__ = ["Distiller", "distillation_config", "student_sampling"]
