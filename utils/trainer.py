"""The training loop: schedules, EMA, checkpoints, exact resume, faults, evaluation.

`Trainer(config).fit()` trains on the in-memory batcher (the whole training set on
the device, one seeded permutation per epoch) and writes, under OUTPUT_DIR, the
sample grids, the loss history and plots, and, under CHECKPOINT_DIR, latest.pt and
the last KEEP periodic checkpoints (empty folders mean a new run folder under runs/,
see utils/runs.py). Everything random is drawn from generators whose states the
checkpoint keeps, so a resumed run continues exactly where it stopped. A checkpoint
that cannot be written (disk full) stops the run with `ckpt.SaveError`, the previous
one intact; a picture or history file that cannot be written is reported and skipped.

The learning rate warms up, then follows LR_SCHEDULE over the fraction of the budget
used (steps of EPOCHS/MAX_STEPS or time of MAX_MINUTES, whichever is further); the EMA
is a constant decay or EDM2's power function (EMA_RULE). Under torchrun the same loop
runs in every process on its slice of each global batch (see utils/distributed.py).
"""
from __future__ import annotations

import copy
import csv
import math
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from config import RUN_CONTROL, Config, ConfigError, flag_for
from models.diffusion import DiffusionModel
from utils import checkpoint as ckpt
from utils import distributed as dist
from utils.data_loader import DataLoaderBatcher, InMemoryBatcher, load_mnist
from utils.seeding import capture_rng_state, restore_rng_state, seed_everything

EVAL_SEED = 2024  # the fixed noise of every in-training evaluation


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was written. args: (signal name, path)."""


class TrainingDiverged(Exception):
    """Too many non-finite losses or gradients in a row; nothing was saved after them."""


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; other values as they are."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


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


def power_ema_gamma(std: float) -> float:
    """EDM2's exponent gamma for a power-function EMA of relative width `std` (sigma_rel):
    the root of std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (Karras et al. 2024, eq. 3)."""
    lo, hi = 0.0, 1e6
    width = lambda g: math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))  # decreasing in g
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if width(mid) > std else (lo, mid)
    return 0.5 * (lo + hi)


def config_for_resume(saved: Config, requested: dict) -> Config:
    """The saved run's config with the explicitly requested run-control settings applied.

    Anything else that differs from the checkpoint is a mismatch: ConfigError.
    """
    for name, value in requested.items():
        if name not in RUN_CONTROL and getattr(saved, name) != value:
            raise ConfigError(f"{flag_for(name)} {value} does not match the checkpoint "
                              f"({getattr(saved, name)}); drop the flag to continue that run")
    return saved.replace(**{k: v for k, v in requested.items() if k in RUN_CONTROL})


class Trainer:
    def __init__(self, config: Config, resume: dict | None = None, log=print,
                 progress: bool = True, evaluator=None, clock=time.perf_counter):
        if not (config.CHECKPOINT_DIR and config.OUTPUT_DIR):
            from utils.runs import with_run_folders

            config = with_run_folders(config)
        self.config = config
        self.log = log if dist.is_main() else (lambda *args: None)  # the others print only errors
        self.progress = progress and dist.is_main()
        self.clock = clock  # seconds; tests pass a fake one for time budgets
        self._ema_gamma = power_ema_gamma(config.EMA_STD)  # for EMA_RULE 'power'

        self.device = torch.device(dist.local_device(config.DEVICE))
        if config.THREADS:
            torch.set_num_threads(config.THREADS)
        seed_everything(config.SEED)
        self.precision = resolve_precision(config.PRECISION, config.DEVICE)

        self.model = DiffusionModel.from_config(config).to(self.device)
        if config.CHANNELS_LAST:
            self.model.unet.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = list(self.ema.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=self.base_lr,
                                           weight_decay=config.WEIGHT_DECAY, fused=True)
        self.generator = torch.Generator(device=self.device).manual_seed(config.SEED + 1)

        if config.LOADER == "dataloader":
            self.batcher = DataLoaderBatcher(config.DATA_DIR, config.BATCH_SIZE, config.SEED,
                                             self.device, config.TRAIN_SIZE, config.NUM_WORKERS,
                                             config.DOWNLOAD)
        else:
            images, labels = load_mnist(config.DATA_DIR, train=True, download=config.DOWNLOAD)
            if config.TRAIN_SIZE:
                images, labels = images[:config.TRAIN_SIZE], labels[:config.TRAIN_SIZE]
            self.batcher = InMemoryBatcher(images, config.BATCH_SIZE, config.SEED, self.device,
                                           labels if config.CONDITIONAL else None)
        self.steps_per_epoch = len(self.batcher)
        self.checkpoint_dir = Path(config.CHECKPOINT_DIR)

        self.step = 0  # optimizer steps taken (skipped non-finite steps count too)
        self.epoch = 0  # completed epochs
        self.batch_in_epoch = 0
        self.losses: list[float] = []
        self.evaluations: list[dict] = []
        self.bad_in_a_row = 0
        self.elapsed = 0.0  # seconds spent in training steps, summed over resumes
        self.stretches: list[dict] = []  # {"step", "world_size"} where each stretch of training began
        if resume is not None:
            self.load_state(resume)
        self._fraction = self.budget_fraction(self.elapsed)  # of the budget used; drives the lr

        if config.COMPILE:
            self.model.unet.compile()
        self.forward = None  # the module the loss runs through: DDP's wrapper under torchrun
        if dist.is_initialized():
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # the buffers are the schedule's constant tables: no need to sync them each step
            no_sync = ("forward_sync_buffers"  # torch >= 2.14 renamed broadcast_buffers
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else "broadcast_buffers")
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **{no_sync: False})
        self.evaluator = evaluator
        self._stop_signal = None
        self.timed_out = False
        self._latest_step = None  # the step latest.pt was last written at, in this process
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ----- settings derived from the config -----
    @property
    def base_lr(self) -> float:
        """LEARNING_RATE is for batch 128; scaled by sqrt(batch / 128) for other sizes."""
        return self.config.LEARNING_RATE * math.sqrt(self.config.BATCH_SIZE / 128)

    def lr_at(self, step: int, fraction: float = 0.0) -> float:
        """Linear warm-up over LR_WARMUP_STEPS, times the decay at `fraction` of the budget."""
        warmup = self.config.LR_WARMUP_STEPS
        return (self.base_lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
                * lr_decay(self.config.LR_SCHEDULE, fraction, self.config.LR_FLOOR))

    def budget_fraction(self, seconds: float) -> float:
        """How much of the run's budget is used, in [0, 1]: the larger of steps taken of
        the total (EPOCHS, MAX_STEPS) and training time of MAX_MINUTES. Step budgets give
        1 exactly at the last step, time budgets when the time is up, on any machine."""
        fraction = self.step / max(1, self.total_steps - 1)
        if self.config.MAX_MINUTES:
            fraction = max(fraction, seconds / (self.config.MAX_MINUTES * 60))
        return min(1.0, fraction)

    def ema_decay_at(self, step: int) -> float:
        """The EMA's decay for the update after optimizer step `step` (0-indexed).

        'power' is EDM2's power-function EMA (Karras et al. 2024, eq. 2): decay
        (1 - 1/t)^(gamma + 1) at t = step + 1, which averages the weights of the whole run
        so far with weights growing as t^gamma; gamma is set so that the ages of the
        averaged weights have a standard deviation of EMA_STD times the run's length. Its
        averaging length thus grows with the run, whatever the budget."""
        if self.config.EMA_RULE == "power":
            t = step + 1
            return (1.0 - 1.0 / t) ** (self._ema_gamma + 1.0)
        if self.config.EMA_WARMUP:
            return min(self.config.EMA_DECAY, (1 + step) / (10 + step))
        return self.config.EMA_DECAY

    @property
    def total_steps(self) -> int:
        total = self.config.EPOCHS * self.steps_per_epoch
        return min(total, self.config.MAX_STEPS) if self.config.MAX_STEPS else total

    # ----- one step -----
    def train_step(self, x0: torch.Tensor, labels: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss, backward, clip, AdamW and EMA update, with no host-device sync.

        x0 is the global batch. Its timesteps and noise are drawn for the whole batch from
        the trainer's generator (the same on every process), and this process keeps its
        slice: with N processes each image gets what it would get in one. A conditional
        model gets the labels, each replaced by "no class" with probability CLASS_DROPOUT
        (drawn after the noise, from the same generator), so that one network learns
        both the conditional and the unconditional prediction (Ho & Salimans 2022). The loss is
        the batch mean in every case (DDP averages the gradients of N slices, each scaled
        by N). A non-finite loss or gradient norm sets AdamW's found_inf flag, so the
        fused update leaves weights and moments untouched for that step. Returns the
        detached loss (the global batch's) and the flag.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self._fraction)
        size = x0.shape[0]
        t = self.model.scheduler.sample_timesteps(size, self.device, self.generator,
                                                  self.config.TIMESTEP_SAMPLING)
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=self.generator)
        # a model without classes ignores the labels (the DataLoader yields them all the same)
        labels = self.drop_labels(labels) if self.config.CONDITIONAL else None
        part = dist.local_slice(size)
        x0, t, noise = x0[part], t[part], noise[part]
        labels = None if labels is None else labels[part]
        if self.config.CHANNELS_LAST:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            per_image = self.model.compute_loss(x0, t, noise, reduction="none",
                                                forward=self.forward, labels=labels)
        loss = per_image.sum() / size  # this process's share of the batch mean
        (loss * dist.world_size()).backward()
        loss = dist.all_reduce_sum_(loss.detach())
        clip = self.config.GRAD_CLIP if self.config.GRAD_CLIP > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = bad.float()  # honoured by fused AdamW, like GradScaler's
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_decay_at(self.step))
        return loss, bad

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The global batch's labels with each replaced by the "no class" token with
        probability CLASS_DROPOUT (one uniform draw per image from the trainer's generator)."""
        if labels is None:
            raise ValueError("a conditional model needs the digits' labels (--conditional)")
        drop = torch.rand(labels.shape, device=self.device, generator=self.generator)
        return torch.where(drop < self.config.CLASS_DROPOUT, self.model.null_label, labels)

    def estimate_step_seconds(self, repeats: int = 2) -> float:
        """Seconds per optimizer step on this machine, from timing forward and backward on
        a blank batch (on a CPU a smaller one, scaled). Weights, generators and random
        states are left exactly as they were."""
        cfg = self.config
        batch = cfg.BATCH_SIZE if self.device.type == "cuda" else min(cfg.BATCH_SIZE, 16)
        x0 = torch.zeros(batch, *self.model.image_shape, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(0)
        times = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for _ in range(repeats + 1):
                start = time.perf_counter()
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=self.precision == "bf16"):
                    loss = self.model.compute_loss(x0, generator=generator)
                loss.backward()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - start)
        self.optimizer.zero_grad(set_to_none=True)
        return min(times[1:]) * cfg.BATCH_SIZE / batch

    # ----- the loop -----
    def fit(self) -> dict:
        """Train until EPOCHS or MAX_STEPS; returns a summary. Raises TrainingInterrupted
        after writing a checkpoint on SIGINT/SIGTERM, TrainingDiverged on repeated NaNs."""
        cfg = self.config
        out_dir = Path(cfg.OUTPUT_DIR)
        if not self.stretches or self.stretches[-1]["world_size"] != dist.world_size():
            self.stretches.append({"step": self.step, "world_size": dist.world_size()})

        def prepare():
            from utils.metrics import save_json

            out_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.checkpoint_dir)
            self._write_or_warn("config.json", save_json,
                                {**cfg.to_dict(), "world_size": dist.world_size(),
                                 "stretches": self.stretches}, out_dir / "config.json")

        dist.wait_for_rank0(prepare)
        n_params = sum(p.numel() for p in self.params)
        self.log(f"training on {self.device} ({self.precision}): {n_params / 1e6:.2f}M parameters, "
                 f"{self.steps_per_epoch} steps of {cfg.BATCH_SIZE} per epoch, "
                 f"{self.total_steps} steps in all"
                 + (f" or {cfg.MAX_MINUTES:g} minutes of training, whichever comes first"
                    if cfg.MAX_MINUTES else "")
                 + (f", resuming at step {self.step}" if self.step else "")
                 + (f"; {dist.world_size()} processes, {cfg.BATCH_SIZE} images a step in all"
                    if dist.world_size() > 1 else ""))
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        try:
            self._loop(bar)
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.finish()

    def _loop(self, bar):
        cfg = self.config
        while self.epoch < cfg.EPOCHS and self.step < self.total_steps and not self.timed_out:
            tick, images_done = self.clock(), 0
            for x0, labels in self.batcher.labelled(self.epoch, self.batch_in_epoch):
                loss, bad = self.train_step(x0, labels)
                self._pending.append((loss, bad))
                self.step += 1
                self.batch_in_epoch += 1
                images_done += x0.shape[0]
                bar.update(1)
                stop = self._after_step(self.elapsed + (self.clock() - tick))
                if self.step % cfg.PRINT_EVERY == 0 or self.step == self.total_steps:
                    self.elapsed += self._flush(tick)
                    rate = images_done / max(self.clock() - tick, 1e-9)
                    tick, images_done = self.clock(), 0
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{self._recent_loss():.4f}",
                                    img_s=f"{rate:.0f}")
                if cfg.SAVE_EVERY_STEPS and self.step % cfg.SAVE_EVERY_STEPS == 0:
                    self.elapsed += self._flush(tick)
                    tick = self.clock()
                    self.save_shared(self.checkpoint_dir / ckpt.LATEST)
                if stop:
                    self.elapsed += self._flush(tick)
                    path = self.save_shared(self.checkpoint_dir / ckpt.LATEST)
                    raise TrainingInterrupted(self._stop_signal, path)
                if self.step >= self.total_steps or self.timed_out:
                    break
            self.elapsed += self._flush(tick)
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.end_of_epoch()

    def _after_step(self, seconds: float) -> bool:
        """After each step, with `seconds` of training so far: update the budget fraction
        (for the lr) and the time limit, and say whether a signal asks to stop. Under
        torchrun every process takes the maximum over all, so they all decide alike."""
        limit = self.config.MAX_MINUTES * 60
        stop, timed_out, self._fraction = dist.agree(
            float(self._stop_signal is not None), float(bool(limit) and seconds >= limit),
            self.budget_fraction(seconds))
        self.timed_out = bool(timed_out)
        if stop and self._stop_signal is None:
            self._stop_signal = "SIGTERM"  # another process got it
        return bool(stop)

    def _flush(self, since: float) -> float:
        """Read the pending losses back (one sync), check for divergence; returns the
        seconds since `since`."""
        if self._pending:
            values = torch.stack([l for l, _ in self._pending]).float().tolist()
            flags = torch.stack([b for _, b in self._pending]).tolist()
            first = self.step - len(values) + 1
            self._pending.clear()
            for i, (value, bad) in enumerate(zip(values, flags)):
                self.losses.append(value)
                self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
                if self.bad_in_a_row >= self.config.MAX_BAD_STEPS:
                    raise TrainingDiverged(
                        f"training stopped at step {first + i}: {self.bad_in_a_row} non-finite "
                        f"losses or gradients in a row (skipped, not applied); the last good "
                        f"checkpoint in {self.config.CHECKPOINT_DIR} is untouched. Try a lower "
                        f"--lr or --grad-clip")
        return self.clock() - since

    def finished(self) -> str | None:
        """Why a (resumed) run has nothing left to do, or None."""
        cfg = self.config
        if self.step >= self.total_steps:
            return f"step {self.step} of {self.total_steps}; raise --epochs or --max-steps to go on"
        if cfg.MAX_MINUTES and self.elapsed >= cfg.MAX_MINUTES * 60:
            return (f"{self.elapsed / 60:.1f} minutes trained of --max-minutes {cfg.MAX_MINUTES:g}; "
                    f"raise --max-minutes to go on")
        return None

    def _recent_loss(self, window: int = 100) -> float:
        recent = [v for v in self.losses[-window:] if math.isfinite(v)]
        return sum(recent) / len(recent) if recent else float("nan")

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signal.Signals(signum).name
        self.log(f"\n{self._stop_signal} received: finishing step {self.step + 1}, then saving")

    # ----- what happens at epoch ends and at the end -----
    def end_of_epoch(self):
        cfg = self.config
        last = self.epoch >= cfg.EPOCHS
        if cfg.EVAL_EVERY and (self.epoch % cfg.EVAL_EVERY == 0 or last):
            self.evaluate()
        if self.epoch % cfg.SAVE_EVERY == 0 or last:
            def save_all():
                self.save(self.checkpoint_dir / ckpt.periodic_name(self.epoch),
                          self.checkpoint_dir / ckpt.LATEST)
                ckpt.prune_periodic(self.checkpoint_dir, cfg.KEEP)
                self._write_or_warn("the sample grid", self.save_samples,
                                    Path(cfg.OUTPUT_DIR) / f"samples_epoch_{self.epoch:04d}.png")
                self._write_or_warn("the loss history", self.write_history)

            dist.wait_for_rank0(save_all)

    def finish(self) -> dict:
        cfg = self.config
        if cfg.EVAL_EVERY and (not self.evaluations or self.evaluations[-1]["step"] != self.step):
            self.evaluate()  # the run stopped between evaluations (max steps or minutes)
            self._latest_step = None  # so that latest.pt records this evaluation too
        latest = self.checkpoint_dir / ckpt.LATEST
        grid = Path(cfg.OUTPUT_DIR) / "samples_final.png"

        def save_all():
            self.save(latest)
            wrote = self._write_or_warn("the sample grid", self.save_samples, grid)
            self._write_or_warn("the loss history", self.write_history)
            return wrote

        grid = dist.broadcast_object(dist.wait_for_rank0(save_all))
        summary = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                   "train_seconds": self.elapsed, "final_loss": self._recent_loss(),
                   "checkpoint": str(latest), "samples": str(grid)}
        self.log(f"done: {self.step} steps ({summary['epoch']:.2f} epochs) in "
                 f"{self.elapsed:.0f} s of training; loss {summary['final_loss']:.4f}\n"
                 f"  checkpoint: {latest}\n  samples:    {grid}\n"
                 f"  loss curve: {Path(cfg.OUTPUT_DIR) / 'loss.png'}")
        return summary

    def _write_or_warn(self, what: str, write, *args):
        """Run `write(*args)`; a failed write (disk full, I/O error) is reported in one line
        and training goes on: a picture must not kill a run whose checkpoint can be saved."""
        try:
            return write(*args)
        except OSError as error:
            where = next((a for a in args if isinstance(a, Path)), Path(self.config.OUTPUT_DIR))
            self.log(f"warning: could not write {what} to {where}: "
                     f"{ckpt.write_failure(error, Path(self.config.OUTPUT_DIR))}; training goes on")
            return None

    def save_samples(self, path: Path) -> Path:
        from utils.visualization import save_images

        cfg = self.config
        count = -(-cfg.NUM_SAMPLES // 10) * 10 if cfg.CONDITIONAL else cfg.NUM_SAMPLES
        labels = self.eval_labels(0, count)  # conditional: whole rows, column k draws digit k
        images = self.ema.sample((count, *self.ema.image_shape), sampler=cfg.SAMPLER,
                                 steps=None if cfg.SAMPLER == "ddpm" else cfg.SAMPLING_STEPS,
                                 eta=cfg.ETA, seed=cfg.SEED, spacing=cfg.SPACING,
                                 labels=labels, guidance=cfg.GUIDANCE)
        nrow = 10 if labels is not None else int(math.sqrt(count))
        return save_images(images, path, nrow=max(1, nrow))

    def eval_labels(self, first: int, count: int) -> torch.Tensor | None:
        """Classes of images first .. first + count - 1 of a conditional model's grids and
        evaluations: image i draws digit i mod 10. None for an unconditional model."""
        if not self.config.CONDITIONAL:
            return None
        return torch.arange(first, first + count, device=self.device) % self.model.num_classes

    def write_history(self):
        from utils.metrics import save_json
        from utils.visualization import plot_loss, plot_training_curves

        out = Path(self.config.OUTPUT_DIR)
        with open(out / "loss_history.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "epoch", "loss"])
            for i, value in enumerate(self.losses):
                writer.writerow([i + 1, f"{(i + 1) / self.steps_per_epoch:.4f}", f"{value:.6g}"])
        if self.losses:
            plot_loss(self.losses, out / "loss.png", steps_per_epoch=self.steps_per_epoch,
                      title=f"training loss ({self.config.MODEL_CHANNELS} channels, "
                            f"batch {self.config.BATCH_SIZE})")
        if self.evaluations:
            save_json({"evaluations": self.evaluations}, out / "evaluations.json")
            plot_training_curves(self.losses, self.evaluations, out / "training_curves.png",
                                 self.steps_per_epoch)

    def evaluate(self) -> dict:
        """FID etc. of EVAL_SAMPLES fixed-seed EMA samples, logged and kept in the history."""
        cfg = self.config
        steps = None if cfg.SAMPLER == "ddpm" else cfg.SAMPLING_STEPS
        part = dist.local_slice(cfg.EVAL_SAMPLES)  # each process draws its share of the images
        images = self.ema.generate(part.stop - part.start, first_index=part.start,
                                   progress=self.progress, sampler=cfg.SAMPLER, steps=steps,
                                   eta=cfg.ETA, seed=EVAL_SEED, spacing=cfg.SPACING,
                                   labels=self.eval_labels(part.start, part.stop - part.start),
                                   guidance=cfg.GUIDANCE)
        images = dist.gather_to_rank0(images.cpu())
        record = dist.broadcast_object(dist.wait_for_rank0(lambda: self._score(images, steps)))
        self.evaluations.append(record)
        return record

    def _score(self, images: torch.Tensor, steps) -> dict:
        """Metrics of the gathered images (on rank 0), logged."""
        cfg = self.config
        if self.evaluator is None:
            from utils.metrics import Evaluator

            self.evaluator = Evaluator(cfg.DATA_DIR, device=self.device, progress=self.progress,
                                       download=cfg.DOWNLOAD)
        labels = self.eval_labels(0, len(images))
        result = self.evaluator.evaluate(images, memorisation=False, precision_recall_k=None,
                                         labels=None if labels is None else labels.cpu())
        record = {"epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch, "step": self.step, "train_seconds": self.elapsed,
                  "num_samples": cfg.EVAL_SAMPLES, "fid": result["fid"],
                  "fid_floor": result["floor"]["fid"],
                  "confident_fraction": result["confident_fraction"],
                  "class_kl": result["class_kl"], "sampler": f"{cfg.SAMPLER}-{steps or cfg.TIMESTEPS}"}
        if labels is not None:
            record.update(guidance=cfg.GUIDANCE,
                          conditional_accuracy=result["conditional_accuracy"])
        self.log(f"epoch {self.epoch}: FID {record['fid']:.2f} (floor {record['fid_floor']:.2f}) "
                 f"on {cfg.EVAL_SAMPLES} samples, {100 * record['confident_fraction']:.1f}% "
                 f"with p > 0.9, class KL {record['class_kl']:.4f}"
                 + (f", {100 * record['conditional_accuracy']:.1f}% the digit asked for "
                    f"(guidance {cfg.GUIDANCE:g})" if labels is not None else ""))
        return record

    # ----- checkpoint state -----
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "evaluations": self.evaluations,
            "bad_in_a_row": self.bad_in_a_row,
            "elapsed": self.elapsed,
            "generator": self.generator.get_state(),
            "stretches": self.stretches,
            "rng": capture_rng_state(),
        }

    def save_shared(self, path: Path) -> Path:
        """Rank 0 saves (see `save`) while the others wait; returns the path on every rank."""
        dist.wait_for_rank0(lambda: self.save(path))
        return path

    def save(self, *paths: Path) -> Path:
        """Write the training state to each path (atomically); returns the last.
        latest.pt is not rewritten when it already holds this step."""
        state = None
        for path in paths:
            if path.name == ckpt.LATEST and self._latest_step == self.step:
                continue
            state = state or self.state_dict()
            try:
                ckpt.save_checkpoint(state, path)
            except ckpt.SaveError as error:
                raise ckpt.SaveError(f"{error}; {self._previous_checkpoint()}") from None
            if path.name == ckpt.LATEST:
                self._latest_step = self.step
        return paths[-1]

    def _previous_checkpoint(self) -> str:
        """What is left on disk after a failed save, and how to go on from it."""
        latest = ckpt.find_latest(self.checkpoint_dir)
        try:
            step = ckpt.load_checkpoint(latest)["step"] if latest else None
        except ckpt.CheckpointError:
            step = None
        if step is None:
            return "no checkpoint of this run was saved before; free space and start again"
        return (f"the previous checkpoint at step {step} is intact; free space and resume "
                f"with: python main.py --resume {latest}")

    def load_state(self, state: dict):
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise ckpt.CheckpointError(f"checkpoint does not fit this model: "
                                       f"{str(error).splitlines()[0][:200]}") from None
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.losses = state["losses"].tolist()
        self.evaluations = list(state.get("evaluations", []))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.elapsed = float(state.get("elapsed", 0.0))
        self.stretches = [dict(s) for s in state.get("stretches", [])]
        try:
            self.generator.set_state(state["generator"].cpu())
        except RuntimeError:  # saved on another kind of device: a fresh stream, seeded
            self.generator.manual_seed(self.config.SEED + 1 + self.step)
        restore_rng_state(state["rng"])

