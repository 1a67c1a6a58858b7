"""Distillation: a trained checkpoint (the teacher) taught to a student that samples in a
few steps, as a training run like any other (budget, exact resume, run folder, plan).

    python main.py --distill runs/NAME/latest.pt --student-steps 4            # progressive
    python main.py --distill runs/NAME/latest.pt --distill-method consistency --student-steps 2
    python main.py --distill runs/NAME/latest.pt --distill-method ect --student-steps 2

All start the student from the teacher's EMA weights, train on the real training images
(and their classes, for a conditional teacher), and write a normal checkpoint whose
config says how to sample it, so `generate.py --checkpoint` needs no flag. The teacher
must predict v (or EDM's F): an eps student's x0 = (x_t - sigma eps) / alpha multiplies
its errors by sigma / alpha, about 157 at t = 999 on the linear schedule, which Salimans
& Ho (2022, sec. 4) found unusable for few steps; an eps teacher is refused.

- progressive (Salimans & Ho 2022, Algorithm 2): rounds that divide the steps by the same
  factor f, from TEACHER_STEPS down to STUDENT_STEPS (`progressive_rounds`: the paper's
  f = 2, or by default the fewest rounds with f <= 4); round k of R gets k / (1 + ... + R)
  of the budget (`round_starts`: the last rounds, whose student steps span the most of
  the ODE, are the hardest and train longest). Each round's student is kept beside the
  run's checkpoints (student_16steps.pt, ...). In a round of S student steps on the
  trailing grid t_k = T(1 - k/(fS)) - 1, one deterministic DDIM step of the student from
  t_fi to t_f(i+1) is trained to land where the teacher's f steps land (DDIM, or in the
  first round DPM-Solver++(2M) with TEACHER_SOLVER dpm-solver): the target x0 is the one
  that DDIM maps z_t onto the teacher's end point (the paper's x-space target x~), and
  the loss is its squared error weighted by max(SNR, 1) ("truncated SNR"), on the
  student's own parameterisation (v). At the end of a round the student becomes the
  teacher. The student samples with DDIM (eta 0, trailing).
  In the last round, distribution matching (DISTRIBUTION_MATCHING, its weight; Yin et al.
  2024, DMD, with DMD2's backward simulation) adds a loss on the student's last step from
  its own chain: its images should be distributed like the data, judged by the teacher's
  score against a fake score trained on them (`_matching_loss`). The regression alone
  averages what the student cannot follow of the teacher's path into blur; with matching
  the 4-step student of 3,000 steps reached FID 3.30 against its teacher's 3.63.
- consistency (Song et al. 2023, consistency distillation): for adjacent points t > t' of
  the teacher's TEACHER_STEPS-point trailing grid (the last one: the clean data), the
  student's x0 prediction at x_t is trained to equal the target network's at x_t', the
  point one DDIM step of the teacher reaches from x_t. The target network is the
  student's EMA (EMA_DECAY): with the student itself as its target (Song & Dhariwal
  2023, who add other changes) a 15-minute run collapsed to one class (FID 870,
  docs/distillation.md). The student samples with the consistency sampler.
- ect, easy consistency tuning (Geng et al. 2024, "Consistency models made easy"):
  consistency training from the teacher's weights, on the data alone (no teacher sampling
  chain): see `Distiller._ect` and `ect_partner`. The student samples with the
  consistency sampler.

Guidance: a conditional teacher's classifier-free guidance W (its GUIDANCE, or `--guidance`
given to the distillation) is baked into the first round's targets (later rounds' teachers
are students that carry it already); the student records it as TEACHER_GUIDANCE and samples
at GUIDANCE 1, so that W is not applied twice. ect learns from the data, so W = 1.

A student cannot be a teacher (its checkpoint says so): distil from the model it came from.
"""
from __future__ import annotations

import math
from bisect import bisect_right

import torch

from config import RUN_CONTROL, Config, ConfigError, flag_for
from models import samplers
from models.diffusion import DiffusionModel
from sampling import pretrained
from training.trainer import Trainer
from utils import checkpoint as ckpt
from utils import distributed as dist
from utils.noise_scheduler import NoiseScheduler, extract

# What a distillation run changes from its teacher's config unless the flags say otherwise
# (no autoguidance: a student keeps no early snapshot to be guided by).
DISTILL_DEFAULTS = dict(MAX_MINUTES=15.0, LEARNING_RATE=1e-3, LR_WARMUP_STEPS=0,
                        LR_SCHEDULE="constant", EMA_RULE="constant", EMA_DECAY=0.999,
                        EMA_WARMUP=True, CLASS_DROPOUT=0.0, EVAL_EVERY=0, EPOCHS=1000,
                        MAX_STEPS=0, CHECKPOINT_DIR="", OUTPUT_DIR="", TIMESTEP_SAMPLING="uniform",
                        GUIDE_AT=0.0, GUIDE_EMA_STD=0.0, AUTOGUIDANCE=1.0)
# Settings of the distillation itself (beside run control) that the flags may set.
DISTILL_FIELDS = {"DISTILL", "DISTILL_METHOD", "STUDENT_STEPS", "TEACHER_STEPS", "DISTILL_ROUNDS",
                  "TEACHER_SOLVER", "DISTRIBUTION_MATCHING", "LEARNING_RATE",
                  "LR_WARMUP_STEPS", "LR_SCHEDULE", "LR_FLOOR", "EMA_RULE", "EMA_DECAY",
                  "EMA_STD", "EMA_WARMUP", "BATCH_SIZE", "GRAD_CLIP", "WEIGHT_DECAY", "SEED",
                  "TRAIN_SIZE", "PRECISION", "CHANNELS_LAST"}

# Easy consistency tuning (Geng et al. 2024; their CIFAR-10 settings and code): t's noise
# level log-normal, ln sigma ~ N(-1.1, 2.0^2); the partner r of t at stage a is
# sigma_r = sigma_t (1 - n(sigma_t) / q^(a+1)), n(s) = 1 + k sigmoid(-b s), q = 2, k = 8, b = 1.
ECT_P_MEAN, ECT_P_STD = -1.1, 2.0
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0
# Stages over the budget: the last gap is n(sigma) / 256 of sigma, about one timestep of
# this 1000-step grid at mid noise, where halving it further changes nothing.
ECT_STAGES = 8
HUBER_C = 0.00054  # pseudo-Huber's c per sqrt(pixels) (Song & Dhariwal 2023): 0.015 for 28x28
# Distribution matching (Yin et al. 2024, DMD and DMD2): the noise levels tau at which the
# teacher's and the student's own distributions are compared, as fractions of T (DMD's).
MATCHING_TAU = (0.02, 0.98)
# Its weight beside the regression, progressive distillation's default (--distribution-matching):
# at 3,000 steps it took the 4-step student from FID 8.79 to 3.30 on 10,000 samples, the
# 1-step from 28.8 to 10.7, the 2-step from 17.9 to 6.8 (docs/distillation.md).
DEFAULT_MATCHING = 1.0


def student_sampling(method: str, steps: int) -> dict:
    """How the student samples: the grid it was trained on, without noise."""
    return dict(SAMPLER="ddim" if method == "progressive" else "consistency",
                SAMPLING_STEPS=steps, ETA=0.0, SPACING="trailing")


def round_starts(rounds: int) -> list[float]:
    """The budget fraction at which each round of progressive distillation begins: round k
    (k = 1 .. rounds) gets k / (1 + 2 + ... + rounds) of the budget. Four rounds (64 -> 4):
    10%, 20%, 30%, 40%; six (64 -> 1): 5% for 64 -> 32, 29% for 2 -> 1."""
    total = rounds * (rounds + 1) / 2
    return [k * (k + 1) / 2 / total for k in range(rounds)]


def progressive_rounds(config: Config) -> tuple[int, int]:
    """(rounds, factor): progressive distillation's rounds, each dividing the steps by
    `factor`, from TEACHER_STEPS to STUDENT_STEPS. DISTILL_ROUNDS 0 is the fewest rounds in
    which a student step spans at most 4 teacher steps (16 -> 4: one; 16 -> 2: three, 16 ->
    8 -> 4 -> 2; 16 -> 1: two, 16 -> 4 -> 1), what measured best or tied at each count
    (docs/distillation.md#one-round-and-the-teachers-dpm-solver-path); Salimans & Ho halve
    in each round. Other methods: one round, factor 1."""
    if config.DISTILL_METHOD != "progressive":
        return 1, 1
    halvings = (config.TEACHER_STEPS // config.STUDENT_STEPS).bit_length() - 1
    rounds = config.DISTILL_ROUNDS or min(r for r in range(1, halvings + 1)
                                          if halvings % r == 0 and halvings // r <= 2)
    return rounds, 2 ** (halvings // rounds)


def ect_partner(scheduler: NoiseScheduler, t: torch.Tensor, stage: int) -> torch.Tensor:
    """The timestep r < t paired with t at curriculum stage `stage` (Geng et al. 2024: the
    mapping r(t) of their dt curriculum, their code's t_to_r_sigmoid); -1 is the clean data.

    ECT's time is EDM's sigma; on this VP schedule that is sigma_t = sqrt((1 - abar_t) / abar_t)
    (x_t / sqrt(abar_t) = x_0 + sigma_t eps), so a pair sharing one noise draw is the same
    pair in both. sigma_r = sigma_t (1 - n(sigma_t) / q^(stage+1)), clipped at 0, becomes the
    largest timestep whose sigma is at most sigma_r (none: -1), and at most t - 1: the gap
    is at least one timestep. Stage 0 pairs most t with the clean data (denoising); each
    stage halves the gap."""
    log_sigmas = scheduler.log_sigmas
    sigma_t = log_sigmas.gather(0, t).exp()
    n = 1 + ECT_K * torch.sigmoid(-ECT_B * sigma_t)
    sigma_r = (sigma_t * (1 - n / ECT_Q ** (stage + 1))).clamp(min=0)
    r = torch.searchsorted(log_sigmas, sigma_r.log(), right=True) - 1
    return torch.minimum(r, t - 1)


def distillation_config(teacher_path, requested: dict) -> Config:
    """The config of a distillation run of the checkpoint at `teacher_path`: the teacher's
    model, DISTILL_DEFAULTS, then the flags given (other settings that differ from the
    teacher's are refused: they would describe another model). A requested GUIDANCE is
    the teacher's, baked into the student (TEACHER_GUIDANCE); the student's is 1.
    "pretrained" names the model that ships with the repo."""
    teacher_path = pretrained.resolve(teacher_path)
    state = ckpt.load_checkpoint(teacher_path)
    teacher = Config.from_dict(state["config"])
    if teacher.DISTILL:
        raise ConfigError(f"--distill {teacher_path} is itself a distilled student (of "
                          f"{teacher.DISTILL}); distil from the model it came from")
    if teacher.PREDICTION == "eps":
        scheduler = NoiseScheduler(teacher.TIMESTEPS, teacher.BETA_START, teacher.BETA_END,
                                   teacher.SCHEDULE_TYPE)
        raise ConfigError(f"--distill {teacher_path} predicts eps (--prediction eps): its "
                          f"student's x0 = (x_t - sigma eps) / alpha would multiply its errors "
                          f"by up to {scheduler.log_sigmas[-1].exp():.0f} at t = "
                          f"{teacher.TIMESTEPS - 1} (Salimans & Ho 2022, sec. 4); distil a "
                          f"teacher trained with --prediction v (the CPU preset's) or edm")
    for name, value in requested.items():
        if (name not in RUN_CONTROL and name not in DISTILL_FIELDS
                and getattr(teacher, name) != value):
            raise ConfigError(f"{flag_for(name)} {value} differs from the teacher's "
                              f"({getattr(teacher, name)}): a student has its teacher's model")
    method = requested.get("DISTILL_METHOD", "progressive")
    steps = requested.get("STUDENT_STEPS", Config.STUDENT_STEPS)
    guidance = requested.get("GUIDANCE", teacher.GUIDANCE) if teacher.CONDITIONAL else 1.0
    if method == "ect" and guidance != 1:
        if "GUIDANCE" in requested:
            raise ConfigError(f"--guidance {guidance:g}: ect trains on the data, not on a "
                              f"teacher's guided outputs, so it learns guidance 1; to bake "
                              f"guidance in, use --distill-method progressive or consistency")
        guidance = 1.0  # ect learns guidance 1 whatever the teacher's (the plan says so)
    # 15 minutes unless told otherwise; a step or epoch budget alone runs without a clock
    clockless = bool({"EPOCHS", "MAX_STEPS"} & set(requested)) and "MAX_MINUTES" not in requested
    settings = {**DISTILL_DEFAULTS, **({"MAX_MINUTES": 0.0} if clockless else {}),
                **student_sampling(method, steps),
                **({"DISTRIBUTION_MATCHING": DEFAULT_MATCHING} if method == "progressive" else {}),
                **requested, "DISTILL": str(teacher_path),
                "GUIDANCE": 1.0, "TEACHER_GUIDANCE": guidance}
    return teacher.replace(**settings).validate()


class Distiller(Trainer):
    """A Trainer whose loss is a teacher's (see the module's docstring); the rest (budget,
    checkpoints, resume, loggers) is the Trainer's."""

    def __init__(self, config: Config, resume: dict | None = None, **kwargs):
        if not config.DISTILL:
            raise ConfigError("a distillation run needs --distill CHECKPOINT")
        source = resume if resume is not None else ckpt.load_checkpoint(config.DISTILL)
        super().__init__(config, resume=resume, **kwargs)
        self.teacher = None  # ect has none
        teacher_config = Config.from_dict(source["config"]).replace(DISTILL="")
        if config.DISTILL_METHOD != "ect":
            self.teacher = DiffusionModel.from_config(teacher_config).to(self.device)
            self.teacher.requires_grad_(False).eval()
            self.teacher.load_state_dict(resume["teacher"] if resume is not None
                                         else source["ema"])
        # distribution matching: the teacher's score of the data (kept apart from the teacher
        # of later rounds, which are students) and the fake score, which learns the student's
        self.score = self.fake = None
        if config.DISTRIBUTION_MATCHING:
            self.score = DiffusionModel.from_config(teacher_config).to(self.device)
            self.score.requires_grad_(False).eval()
            self.fake = DiffusionModel.from_config(teacher_config).to(self.device)
            start = resume if resume is not None else {"score": source["ema"], "fake": source["ema"]}
            self.score.load_state_dict(start["score"])
            self.fake.load_state_dict(start["fake"])
            self.fake_optimizer = torch.optim.AdamW(self.fake.parameters(), lr=self.base_lr,
                                                    weight_decay=config.WEIGHT_DECAY, fused=True)
            if resume is not None:
                self.fake_optimizer.load_state_dict(resume["fake_optimizer"])
        if resume is None:  # the student starts as the teacher (its EMA weights)
            self.model.load_state_dict(source["ema"])
            self.ema.load_state_dict(source["ema"])
            self.round, self.round_start = 0, 0
        self.rounds, self.factor = progressive_rounds(config)
        # the grid the student samples on (trailing-v1: a run begun before trailing was Lin et al.'s)
        self.grid = "trailing-v1" if config.SPACING == "trailing-v1" else "trailing"

    # ----- the schedule of rounds (progressive) and stages (ect) -----
    def _round_for(self, fraction: float) -> int:
        return bisect_right(round_starts(self.rounds), fraction) - 1

    def student_steps(self) -> int:
        """The steps the student learns in the current round."""
        cfg = self.config
        if cfg.DISTILL_METHOD != "progressive":
            return cfg.STUDENT_STEPS
        return cfg.TEACHER_STEPS // self.factor ** (self.round + 1)

    def teacher_guidance(self) -> float:
        """The guidance of the teacher's outputs: TEACHER_GUIDANCE in the first round; the
        teacher of a later round is an earlier student, whose outputs carry it already."""
        return self.config.TEACHER_GUIDANCE if self.round == 0 else 1.0

    def ect_stage(self) -> int:
        """ect's curriculum stage, a function of the budget used (like the lr): exact on resume."""
        return min(ECT_STAGES - 1, int(self._fraction * ECT_STAGES))

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

    def lr_at(self, step: int, fraction: float = 0.0) -> float:
        """In progressive distillation the learning-rate schedule (LR_SCHEDULE) runs once per
        round, over the round's share of the budget, as Salimans & Ho anneal it to 0 in
        each: every round's student ends converged before it teaches the next. (The other
        methods have one round: the budget's schedule.)"""
        starts = round_starts(self.rounds) + [1.0]
        k = self._round_for(fraction)
        return super().lr_at(step, (fraction - starts[k]) / (starts[k + 1] - starts[k]))

    def plan(self) -> str:
        """The Trainer's plan, and a line on what the distillation does."""
        return super().plan() + "\n" + self.describe_method()

    def describe_method(self) -> str:
        cfg = self.config
        steps = cfg.STUDENT_STEPS
        if cfg.DISTILL_METHOD == "progressive":
            chain = " -> ".join(str(cfg.TEACHER_STEPS // self.factor ** k)
                                for k in range(self.rounds + 1))
            starts = round_starts(self.rounds) + [1.0]
            shares = ", ".join(f"{b - a:.0%}" for a, b in zip(starts, starts[1:]))
            solver = ("DPM-Solver++(2M)" if cfg.TEACHER_SOLVER == "dpm-solver" else "DDIM")
            rounds = ("one round" if self.rounds == 1 else
                      f"{self.rounds} rounds of {shares} of the budget (the later, harder "
                      f"rounds longer)")
            text = (f"distillation: progressive (Salimans & Ho 2022), {chain} steps in "
                    f"{rounds}, a student step copying {self.factor} of its teacher's "
                    f"(the first round's by {solver}); the student samples with DDIM on the "
                    f"trailing grid")
            if cfg.DISTRIBUTION_MATCHING:
                text += (f"; in the last round its last step also matches the data's "
                         f"distribution (DMD, Yin et al. 2024; weight "
                         f"{cfg.DISTRIBUTION_MATCHING:g}), against a fake score trained on "
                         f"its own images")
            if cfg.LR_SCHEDULE != "constant":
                text += (f"; the learning rate decays ({cfg.LR_SCHEDULE}) to {cfg.LR_FLOOR:g} "
                         f"of its peak in each round")
        elif cfg.DISTILL_METHOD == "consistency":
            text = (f"distillation: consistency (Song et al. 2023) along the teacher's "
                    f"{cfg.TEACHER_STEPS}-point DDIM path, the student's EMA as its target; "
                    f"the student samples with the consistency sampler in {steps} step(s)")
        else:
            text = (f"distillation: easy consistency tuning (Geng et al. 2024) on the training "
                    f"images, no teacher sampling: {ECT_STAGES} stages of the budget, the gap "
                    f"between the pair's noise levels halving in each (to 1/"
                    f"{ECT_Q ** ECT_STAGES:.0f}); the student samples with the consistency "
                    f"sampler in {steps} step(s)")
        if cfg.CONDITIONAL:
            text += (f"; the teacher's guidance {cfg.TEACHER_GUIDANCE:g} is baked into the "
                     f"targets, so the student samples at --guidance 1"
                     if cfg.TEACHER_GUIDANCE != 1 else
                     "; the student learns the unguided conditional model (guidance 1)")
        return text

    # ----- the loss -----
    def per_image_loss(self, x0: torch.Tensor, labels: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.DISTILL_METHOD == "ect":
            return self._ect(x0, labels)
        self._next_round_if_due()
        size = x0.shape[0]
        progressive = cfg.DISTILL_METHOD == "progressive"
        # progressive: the teacher's grid of the round, `factor` of its steps per student
        # step; consistency: adjacent points of the teacher's whole grid
        jump = self.factor if progressive else 1
        points = jump * self.student_steps() if progressive else cfg.TEACHER_STEPS
        grid = torch.tensor(samplers.timestep_sequence(self.model.timesteps, points, self.grid)
                            + [-1], device=self.device)
        index = jump * torch.randint(0, (len(grid) - 1) // jump, (size,), device=self.device,
                                     generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=self.generator)
        part = dist.local_slice(size)
        draws = self._matching_draws(x0.shape, part) if progressive and self.matching() else None
        x0, index, noise = x0[part], index[part], noise[part]
        labels = None if labels is None or not cfg.num_classes else labels[part]
        t = grid[index]
        if progressive:
            path = [grid[index + j] for j in range(jump + 1)]
            per_image = self._progressive(x0, path, noise, labels, draws)
        else:
            per_image = self._consistency(x0, t, grid[index + 1], noise, labels)
        return per_image, t

    def _teacher_ddim(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                      labels) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM step of the teacher, per-image timesteps; t_next = -1 is
        the clean data (the teacher's x0). -> (x at t_next, the teacher's x0 at t)."""
        return self._ddim(self.teacher, x, t, t_next, labels, self.teacher_guidance())

    def _predict(self, model: DiffusionModel, x, t, labels, guidance: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """`model`'s (x0, eps) at (x, t), per-image t, as its sampler computes them."""
        out = model.denoiser(self.precision, labels, guidance)(x, t).float()
        return model.scheduler.split_model_output(x, t, out, model.prediction, model.clip_x0)

    def _ddim(self, model: DiffusionModel, x, t, t_next, labels, guidance: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM step of `model` (see _teacher_ddim), without gradients."""
        x0, eps = self._predict(model, x, t, labels, guidance)
        a_next = extract(model.scheduler.alphas_cumprod_padded, t_next + 1, x.shape)
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, x0

    def _teacher_path(self, x: torch.Tensor, path: list[torch.Tensor], labels) -> torch.Tensor:
        """The teacher's deterministic solve of x from the timesteps path[0] through each of
        path[1:] (per image; -1 is the clean data). DDIM; with TEACHER_SOLVER dpm-solver in
        the first round, DPM-Solver++(2M) (models/samplers.py's update, per image), its
        history starting afresh at path[0]: DDIM's first-order step, then second order,
        and x0 itself at the clean data (as the sampler's last step)."""
        second_order = self.config.TEACHER_SOLVER == "dpm-solver" and self.round == 0
        scheduler = self.teacher.scheduler
        previous = None  # the last sub-step's x0 and step size in lambda
        for t, t_next in zip(path, path[1:]):
            step, x0 = self._teacher_ddim(x, t, t_next, labels)
            if second_order:
                inside = t_next >= 0
                # lambda = log(alpha / sigma) = -log_sigmas; finite only inside
                h = (scheduler.log_sigmas.gather(0, t)
                     - scheduler.log_sigmas.gather(0, t_next.clamp(min=0)))
                if previous is not None:
                    x0_prev, h_prev = previous
                    a_next = extract(scheduler.alphas_cumprod_padded, t_next + 1, x.shape)
                    h_, h_prev_ = h.reshape(-1, 1, 1, 1), h_prev.reshape(-1, 1, 1, 1)
                    # D = x0 + (x0 - x0_prev) / (2r), r = h_prev / h, on top of DDIM's step
                    correction = (-a_next.sqrt() * torch.expm1(-h_) * h_ / (2 * h_prev_)
                                  * (x0 - x0_prev))
                    step = step + torch.where(inside.reshape(-1, 1, 1, 1), correction, 0.0)
                previous = (x0, h)
            x = step
        return x

    def _student_x0(self, x0, t, noise, labels, grad: bool = True):
        """The student's x0 prediction at x_t = q(x_t | x0, noise), through the DDP wrapper
        (for the gradients) when `grad`."""
        scheduler = self.model.scheduler
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            output, _ = ((self.forward if grad else None) or self.model)(x0, t, noise, labels)
        xt, _ = scheduler.add_noise(x0, t, noise)
        return scheduler.split_model_output(xt, t, output.float(), self.model.prediction,
                                            clip_x0=False)[0]

    def _progressive(self, x0, path, noise, labels, draws: dict | None = None) -> torch.Tensor:
        """The regression on the teacher's path; with `draws` (distribution matching), plus
        DISTRIBUTION_MATCHING times `_matching_loss` of the student's last step, whose
        network call joins the regression's (one call on both batches)."""
        scheduler = self.model.scheduler
        t, t_end = path[0], path[-1]
        z_t, _ = scheduler.add_noise(x0, t, noise)
        with torch.no_grad():
            z_end = self._teacher_path(z_t, path, labels)
            a_t = extract(scheduler.alphas_cumprod_padded, t + 1, x0.shape)
            a_end = extract(scheduler.alphas_cumprod_padded, t_end + 1, x0.shape)
            ratio = ((1 - a_end) / (1 - a_t)).sqrt()  # sigma_end / sigma_t
            target = (z_end - ratio * z_t) / (a_end.sqrt() - ratio * a_t.sqrt())
            weight = extract(scheduler.snr, t, x0.shape).clamp(min=1.0)[:, 0, 0, 0]
        if draws is None:
            prediction = self._student_x0(x0, t, noise, labels)
            return weight * (prediction - target).square().mean(dim=(1, 2, 3))
        x_last, t_last = self._own_chain(draws["start"], labels)
        # x_last as "x0 / sqrt(abar) with no noise", so that the student's forward (the DDP
        # wrapper's, for its gradient hooks) noises it to exactly x_last
        a_last = extract(scheduler.alphas_cumprod_padded, t_last + 1, x0.shape)
        both = self._student_x0(torch.cat([x0, x_last / a_last.sqrt()]), torch.cat([t, t_last]),
                                torch.cat([noise, torch.zeros_like(x_last)]),
                                None if labels is None else torch.cat([labels, labels]))
        prediction, generated = both.split(x0.shape[0])
        regression = weight * (prediction - target).square().mean(dim=(1, 2, 3))
        matching = self._matching_loss(generated, labels, draws)
        return regression + self.config.DISTRIBUTION_MATCHING * matching

    # ----- distribution matching (Yin et al. 2024, DMD; DMD2's backward simulation) -----
    def matching(self) -> bool:
        """Whether this step adds distribution matching: in the last round only (the
        earlier rounds' students are teachers, whose paths the next round copies)."""
        return bool(self.config.DISTRIBUTION_MATCHING) and self.round == self.rounds - 1

    def _matching_draws(self, shape, part: slice) -> dict:
        """Its random draws for the global batch (this process keeps `part`): the chain's
        start, the noise level tau and noise of the comparison, the fake score's training
        timesteps and noise."""
        size, scheduler, g = shape[0], self.model.scheduler, self.generator
        lo, hi = (round(f * (self.model.timesteps - 1)) for f in MATCHING_TAU)
        draws = dict(start=torch.randn(shape, device=self.device, generator=g),
                     tau=torch.randint(lo, hi + 1, (size,), device=self.device, generator=g),
                     eps=torch.randn(shape, device=self.device, generator=g),
                     t_fake=scheduler.sample_timesteps(size, self.device, g),
                     noise_fake=torch.randn(shape, device=self.device, generator=g))
        return {name: value[part] for name, value in draws.items()}

    @torch.no_grad()
    def _own_chain(self, start: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """DMD2's backward simulation: the student (its EMA, as it samples) run from pure
        noise through all but its last step, deterministic DDIM on its grid. -> (x at the
        last step's timestep, that timestep per image)."""
        grid = samplers.timestep_sequence(self.model.timesteps, self.student_steps(), self.grid)
        full = lambda step: torch.full((start.shape[0],), step, device=self.device)
        x = start
        for t, t_next in zip(grid, grid[1:]):
            x, _ = self._ddim(self.ema, x, full(t), full(t_next), labels)
        return x, full(grid[-1])

    def _matching_loss(self, generated: torch.Tensor, labels, draws: dict) -> torch.Tensor:
        """The distribution-matching loss of the student's images `generated` (Yin et al.
        2024, their code's form): noised to a level tau, the teacher's x0 ("real") and the
        fake score's ("fake", a copy of the teacher trained on the student's images) differ
        by the gradient of KL(student || data) in x0; the images step along it:

            grad = (fake - real) / mean|x - real|,   loss = ||x - sg(x - grad)||^2 / 2,

        (the mean per image: DMD's normalisation). The fake score then takes its own
        optimizer step on these images (one per student step). Per-image losses."""
        x = generated.detach()
        with torch.no_grad():
            x_tau, _ = self.model.scheduler.add_noise(x, draws["tau"], draws["eps"])
            real = self._predict(self.score, x_tau, draws["tau"], labels,
                                 self.config.TEACHER_GUIDANCE)[0]
            fake = self._predict(self.fake, x_tau, draws["tau"], labels)[0]
            scale = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
            target = x - (fake - real) / scale
        self._train_fake(x, labels, draws)
        return 0.5 * (generated - target).square().mean(dim=(1, 2, 3))

    def _train_fake(self, x: torch.Tensor, labels, draws: dict) -> None:
        """One step of the fake score's denoising loss on the student's images x (its
        gradients averaged over processes, as DDP would)."""
        for group in self.fake_optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self._fraction)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            loss = self.fake.compute_loss(x, draws["t_fake"], draws["noise_fake"], labels=labels)
        loss.backward()
        grads = [p.grad for p in self.fake.parameters() if p.grad is not None]
        if dist.world_size() > 1:
            for grad in grads:
                dist.all_reduce_sum_(grad).div_(dist.world_size())
        clip = self.config.GRAD_CLIP if self.config.GRAD_CLIP > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(grads, clip, foreach=True)
        self.fake_optimizer.found_inf = (~torch.isfinite(norm)).float()
        self.fake_optimizer.step()
        self.fake_optimizer.zero_grad(set_to_none=True)

    def _consistency(self, x0, t, t_next, noise, labels) -> torch.Tensor:
        scheduler = self.model.scheduler
        x_t, _ = scheduler.add_noise(x0, t, noise)
        with torch.no_grad():
            x_next, _ = self._teacher_ddim(x_t, t, t_next, labels)
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

    def _ect(self, x0: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Easy consistency tuning (Geng et al. 2024, their ECMLoss), on this VP grid:

            t ~ log-normal noise levels (ECT_P_MEAN, ECT_P_STD), r = ect_partner(t, stage),
            x_t = alpha_t x0 + sigma_t eps,  x_r = alpha_r x0 + sigma_r eps  (one eps),
            loss = d(f(x_t, t), sg f(x_r, r)) / (s_t - s_r),

        f the student's x0 prediction (f at the clean level, r = -1, is x0 itself), sg a
        stop-gradient of the same network (no EMA target; the same dropout mask, as ECT
        shares it), d(a, b) = sqrt(||a - b||^2 + c^2) - c the pseudo-Huber distance (ECT's
        adaptive weighting with p = 1/2, c = HUBER_C sqrt(pixels)), and 1 / (s_t - s_r) ECT's
        weighting 1 / (t - r) in their time, EDM's sigma: s_t = sqrt((1 - abar_t) / abar_t)."""
        scheduler, size = self.model.scheduler, x0.shape[0]
        t = scheduler.sample_timesteps(size, self.device, self.generator, "lognormal",
                                       ECT_P_MEAN, ECT_P_STD)
        r = ect_partner(scheduler, t, self.ect_stage())
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=self.generator)
        part = dist.local_slice(size)
        x0, t, r, noise = x0[part], t[part], r[part], noise[part]
        labels = None if labels is None or not self.config.num_classes else labels[part]
        clean = (r < 0).reshape(-1, 1, 1, 1)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            target = torch.where(clean, x0, self._student_x0(x0, r.clamp(min=0), noise, labels,
                                                              grad=False))
        prediction = self._student_x0(x0, t, noise, labels)
        c = HUBER_C * math.sqrt(x0[0].numel())
        distance = ((prediction - target).square().sum(dim=(1, 2, 3)) + c ** 2).sqrt() - c
        sigmas = scheduler.log_sigmas.exp()
        gap = sigmas.gather(0, t) - torch.where(r < 0, 0.0, sigmas.gather(0, r.clamp(min=0)))
        return distance / gap, t

    # ----- what a checkpoint holds beyond the Trainer's -----
    def state_dict(self) -> dict:
        return {**super().state_dict(), "round": self.round, "round_start": self.round_start,
                **({"teacher": self.teacher.state_dict()} if self.teacher is not None else {}),
                **({"score": self.score.state_dict(), "fake": self.fake.state_dict(),
                    "fake_optimizer": self.fake_optimizer.state_dict()}
                   if self.fake is not None else {})}

    def load_state(self, state: dict):
        super().load_state(state)
        self.round = int(state.get("round", 0))
        self.round_start = int(state.get("round_start", 0))

    def estimate_step_seconds(self, repeats: int = 2) -> float:
        """A training step, plus the forward passes without gradients, each about a third
        of a step: progressive, the teacher's `factor` (one per teacher step a student step
        copies); consistency, the teacher's and the student's own; ect, one (the target).
        Distribution matching adds about a step more than doubles it."""
        extra = {"ect": 1, "consistency": 2}.get(self.config.DISTILL_METHOD, self.factor)
        if self.config.DISTRIBUTION_MATCHING:  # the student's chain, its second batch, the
            # two scores and the fake score's training step (as if in every round)
            extra += self.config.STUDENT_STEPS - 1 + 3 + 2 + 3
        return super().estimate_step_seconds(repeats) * (1 + extra / 3)


__all__ = ["Distiller", "distillation_config", "student_sampling", "round_starts", "ect_partner",
           "progressive_rounds"]
