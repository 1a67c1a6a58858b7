"""The training loop: steps, budgets, checkpoints, exact resume, faults, evaluation.

`Trainer(config).fit()` trains on the in-memory batcher (the whole training set on
the device, one seeded permutation per epoch) and writes, under CHECKPOINT_DIR,
latest.pt and the last KEEP periodic checkpoints, and, through its loggers
(training/logging.py), the sample grids, the loss history and plots under OUTPUT_DIR.
Everything random is drawn from generators whose states the checkpoint keeps, so a
resumed run continues exactly where it stopped. A checkpoint that cannot be written
(disk full) stops the run with `SaveError`, the previous one intact; a picture,
history file or evaluation that fails is reported in one line and training goes on.

The public interface: `fit()`, `finished()`, `plan()`, `extend(...)` (continue to a new
budget), `evaluate()`, `train_step(x0, labels)`, `batches()`, `estimate_step_seconds()`,
and read-only `config`, `step`, `epoch`, `elapsed`, `losses`, `evaluations`, `model`,
`ema`, `steps_per_epoch`, `total_steps`. Under torchrun the same loop runs in every
process on its slice of each global batch (see utils/distributed.py).
"""
from __future__ import annotations

import copy
import inspect
import math
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from config import RUN_CONTROL, Config, ConfigError, config_for_resume
from evaluation.metrics import Evaluator
from models.diffusion import DiffusionModel
from sampling.api import guidance_strip
from sampling.settings import (arrange, choose_classes, for_training, labels_for,
                               resolve_precision, row_labels)
from training.logging import GUIDANCE_STRIP, RunInfo, RunLogger, make_loggers
from training.schedules import EmaSchedule, base_lr, lr_at
from utils import allocator, machine
from utils import checkpoint as ckpt
from utils import distributed as dist
from utils.clusters import cluster_images
from utils.data_loader import DataLoaderBatcher, InMemoryBatcher
from utils.datasets import Dataset, open_dataset
from utils.errors import DataError, Interrupted, ResourceError, first_line
from utils.files import remove_stale_temporaries, save_json
from utils.runs import with_run_folders
from utils.seeding import capture_rng_state, restore_rng_state, seed_everything
from utils.text import duration

EVAL_SEED = 2024  # the fixed noise of every in-training evaluation
QUARTILES = 4  # the loss is also logged per quarter of the timesteps
GRID_SHARE = 0.1  # at most this share of a run's time goes to its sample grids at epoch ends


class TrainingInterrupted(Interrupted):
    """SIGINT or SIGTERM arrived; a checkpoint was written. .path: where. Under torchrun
    only rank 0 says so (the others' message is empty)."""

    def __init__(self, signal_name: str, path: Path):
        super().__init__(f"stopped by {signal_name}; checkpoint saved to {path}\n"
                         f"resume with: python main.py --resume {path}"
                         if dist.is_main() else "", signal_name)
        self.path = path


class TrainingDiverged(DataError):
    """Too many non-finite losses or gradients in a row; nothing was saved after them."""


def open_training_data(config: Config) -> Dataset:
    return open_dataset(config.DATASET, config.DATA_DIR or None, config.DOWNLOAD,
                        config.CHANNELS, config.IMAGE_SIZE)


def with_dataset_classes(config: Config, dataset: Dataset) -> Config:
    """The config of a new run, with its dataset's classes recorded (checked against
    CONDITIONAL: learning classes needs at least two)."""
    if config.CONDITIONAL and dataset.num_classes < 2:
        raise ConfigError(f"--conditional needs a dataset with classes; {dataset.title} has "
                          f"none (put its images in one subfolder per class), or train with "
                          f"--no-conditional")
    data_dir = str(dataset.root.resolve()) if dataset.name == "folder" else config.DATA_DIR
    return config.replace(CLASS_NAMES=dataset.class_names, DATA_FINGERPRINT=dataset.fingerprint,
                          DATA_DIR=data_dir)  # a folder's by its full path: found from anywhere


class Trainer:
    def __init__(self, config: Config, resume: dict | None = None, log=print,
                 progress: bool = True, evaluator=None, clock=time.perf_counter,
                 loggers: list[RunLogger] | None = None):
        if not (config.CHECKPOINT_DIR and config.OUTPUT_DIR):
            config = with_run_folders(config)
        self.log = log if dist.is_main() else (lambda *args: None)  # the others print only errors
        self.progress = progress and dist.is_main()
        self.clock = clock  # seconds; tests pass a fake one for time budgets
        self.dataset = open_training_data(config)
        if resume is None:
            config = with_dataset_classes(config, self.dataset)
        else:  # the data met now must be the data the run started on
            note = self.dataset.check_recorded(config.CLASS_NAMES, config.DATA_FINGERPRINT,
                                               "the run being resumed")
            if note:
                log(note + "; training goes on with it")
        self._config = config
        self._ema_decay = EmaSchedule(config)
        self._guide_ema_decay = (EmaSchedule(config.replace(EMA_RULE="power",
                                                            EMA_STD=config.GUIDE_EMA_STD))
                                 if config.GUIDE_EMA_STD else None)

        allocator.tune()  # big temporaries at every step: keep them off mmap (utils/allocator.py)
        self.device = torch.device(dist.local_device(config.DEVICE))
        shared = machine.share_cpu(config.THREADS, self.device)  # e.g. beside another run
        if shared:
            self.log(shared)
        self.cluster_ids = self._clusters(resume)  # the images' clusters (--clusters), or None
        seed_everything(config.SEED)
        self.precision = resolve_precision(config.PRECISION, config.DEVICE)

        self._build_model()
        self.generator = torch.Generator(device=self.device).manual_seed(config.SEED + 1)
        self.batcher = self._make_batcher()
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
        self.machines: list[dict] = []  # {"step", **utils.machine.record, "precision"} where training moved to a machine
        self.guide_step: int | None = None  # the step of the EMA snapshot kept as autoguidance's guide
        if resume is not None:
            self.load_state(resume)
        self._fraction = self.budget_fraction(self.elapsed)  # of the budget used; drives the lr

        if config.COMPILE:
            self.model.unet.compile()
        self.forward = self._wrap_for_processes()  # DDP's wrapper under torchrun, else None
        self.evaluator = evaluator
        self.loggers = (loggers if loggers is not None else make_loggers(config, self.log)) \
            if dist.is_main() else []
        self._stop_signal = None
        self.timed_out = False
        self._latest_step = None  # the step latest.pt was last written at, in this process
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._picture_seconds = 0.0  # spent drawing grids at epoch ends, in this process
        self._reserve = 0.0  # seconds a time budget keeps for the final save and grid
        self._measured_reserve = False  # whether _reserve was measured (else estimated)
        self._said_grids = False
        self._bins = torch.zeros(2, QUARTILES, device=self.device, dtype=torch.float64)

    def _training_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images trained on and their labels (the first TRAIN_SIZE, if set)."""
        images, labels = self.dataset.load("train")
        size = self._config.TRAIN_SIZE
        return (images[:size], labels[:size]) if size else (images, labels)

    def _clusters(self, resume: dict | None) -> torch.Tensor | None:
        """The cluster of each training image, for a run with CLUSTERS: k-means at a new
        run's start (their sizes recorded in the config, for sampling), the recorded ones
        on resume (so it continues on exactly the same classes)."""
        cfg = self._config
        if not cfg.CLUSTERS:
            return None
        if resume is not None and "clusters" in resume:
            return resume["clusters"].long()
        images, _ = self._training_images()
        if cfg.CLUSTERS > len(images):
            raise ConfigError(f"--clusters {cfg.CLUSTERS} exceeds the {len(images):,} training "
                              f"images of {self.dataset.title}: ask for fewer (--clusters 0: "
                              f"none)")
        started = time.perf_counter()
        ids, sizes = cluster_images(images, cfg.CLUSTERS)
        self.log(f"clusters: k-means of the {len(images):,} training images into "
                 f"{cfg.CLUSTERS} (sizes {min(sizes):,}-{max(sizes):,}) in "
                 f"{duration(time.perf_counter() - started)}; the model learns them as classes")
        if cfg.CLUSTER_SIZES and tuple(cfg.CLUSTER_SIZES) != sizes:  # e.g. a teacher's
            self.log("warning: these clusters differ from the ones recorded in the checkpoint "
                     "(another machine's float arithmetic moved k-means); training goes on "
                     "with the new ones")
        self._config = cfg.replace(CLUSTER_SIZES=sizes)
        return ids

    def _build_model(self) -> None:
        """The model, its EMA (what samples) and the optimizer, on the run's device."""
        config = self._config
        self.model = DiffusionModel.from_config(config).to(self.device)
        if config.CHANNELS_LAST:
            self.model.unet.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema_params = list(self.ema.parameters())
        # the guide's own power EMA (GUIDE_EMA_STD) until keep_guide takes it; None: the EMA's
        self.guide_ema = (copy.deepcopy(self.ema) if config.GUIDE_AT and config.GUIDE_EMA_STD
                          else None)
        self._guide_ema_params = list(self.guide_ema.parameters()) if self.guide_ema is not None else []
        self.optimizer = torch.optim.AdamW(self.params, lr=base_lr(config),
                                           weight_decay=config.WEIGHT_DECAY, fused=True)

    def _make_batcher(self):
        config = self._config
        images, labels = self._training_images()
        if self.cluster_ids is not None:
            labels = self.cluster_ids
        if config.BATCH_SIZE > len(images):
            raise ConfigError(f"--batch-size {config.BATCH_SIZE} exceeds the {len(images):,} "
                              f"training images of {self.dataset.title}")
        if config.LOADER == "dataloader":
            return DataLoaderBatcher(images, labels, config.BATCH_SIZE, config.SEED, self.device,
                                     config.NUM_WORKERS)
        return InMemoryBatcher(images, config.BATCH_SIZE, config.SEED, self.device,
                               labels if config.num_classes else None)

    def _wrap_for_processes(self):
        if not dist.is_initialized():
            return None
        # the buffers are the schedule's constant tables: no need to sync them each step
        no_sync = ("forward_sync_buffers"  # torch >= 2.14 renamed broadcast_buffers
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else "broadcast_buffers")
        return DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **{no_sync: False})

    # ----- the run's settings and budget -----
    @property
    def config(self) -> Config:
        return self._config

    def extend(self, **changes) -> None:
        """Continue to a new budget: run-control settings only (e.g. MAX_MINUTES=4,
        EVAL_SAMPLES=2000); the next `fit()` trains on from here."""
        for name in changes:
            if name not in RUN_CONTROL:
                raise ConfigError(f"{name} cannot change during a run (only {', '.join(sorted(RUN_CONTROL))})")
        self._config = config_for_resume(self._config, changes).validate()
        self.timed_out = False
        self._fraction = self.budget_fraction(self.elapsed)

    @property
    def base_lr(self) -> float:
        return base_lr(self._config)

    def lr_at(self, step: int, fraction: float = 0.0) -> float:
        return lr_at(self._config, step, fraction)

    def ema_decay_at(self, step: int) -> float:
        return self._ema_decay(step)

    def budget_fraction(self, seconds: float) -> float:
        """How much of the run's budget is used, in [0, 1]: the larger of steps taken of
        the total (EPOCHS, MAX_STEPS) and training time of MAX_MINUTES. Step budgets give
        1 exactly at the last step, time budgets when the time is up, on any machine."""
        fraction = self.step / max(1, self.total_steps - 1)
        if self._config.MAX_MINUTES:
            fraction = max(fraction, seconds / (self._config.MAX_MINUTES * 60))
        return min(1.0, fraction)

    def progress_fraction(self, seconds: float) -> float:
        """The share of the run done, for the progress bar: steps of the step budget or
        time of the time budget (with the time kept for the final save), whichever is
        further; 1 when the run ends."""
        fraction = self.step / max(1, self.total_steps)
        if self._config.MAX_MINUTES:
            fraction = max(fraction, (seconds + self._reserve) / (self._config.MAX_MINUTES * 60))
        return min(1.0, fraction)

    @property
    def total_steps(self) -> int:
        total = self._config.EPOCHS * self.steps_per_epoch
        return min(total, self._config.MAX_STEPS) if self._config.MAX_STEPS else total

    def finished(self) -> str | None:
        """Why a (resumed) run has nothing left to do, or None."""
        cfg = self._config
        if self.step >= self.total_steps:
            return f"step {self.step} of {self.total_steps}; raise --epochs or --max-steps to go on"
        if cfg.MAX_MINUTES and self.elapsed >= cfg.MAX_MINUTES * 60:
            return (f"{self.elapsed / 60:.1f} minutes trained of --max-minutes {cfg.MAX_MINUTES:g}; "
                    f"raise --max-minutes to go on")
        return None

    def plan(self) -> str:
        """What the run will do and roughly how long it will take on this machine."""
        cfg = self._config
        steps_left = self.total_steps - self.step
        seconds = steps_left * self.estimate_step_seconds()
        limit = cfg.MAX_MINUTES * 60 - self.elapsed if cfg.MAX_MINUTES else None
        budget = (f"{cfg.EPOCHS} epochs" if self.total_steps == cfg.EPOCHS * self.steps_per_epoch
                  else f"{steps_left / self.steps_per_epoch:.1f} epochs")
        if limit is not None and limit < seconds:
            text = (f"plan: {duration(limit)} of training (--max-minutes {cfg.MAX_MINUTES:g}; "
                    f"{budget} would take about {duration(seconds)} on this machine)")
        else:
            text = (f"plan: {steps_left:,} steps of {cfg.BATCH_SIZE} ({budget}), about "
                    f"{duration(seconds)} on this machine; Ctrl-C saves a checkpoint, "
                    f"--max-minutes caps the time")
        if cfg.EVAL_EVERY:
            count = self._evaluation_count(min(seconds, limit or seconds))
            each = cfg.EVAL_SAMPLES * for_training(cfg).network_evaluations(cfg.num_classes > 0) \
                * self.estimate_step_seconds() / (3 * cfg.BATCH_SIZE)
            text += (f"; plus {count} evaluation(s) of {cfg.EVAL_SAMPLES} samples (--eval-every "
                     f"{cfg.EVAL_EVERY}), about {duration(each)} each, outside the budget")
        return self.describe_data() + "\n" + text

    def describe_data(self) -> str:
        """The data line of the plan: what was found, the classes, where the test split
        comes from."""
        data, cfg = self.dataset, self._config
        names = data.class_names
        classes = (f"{len(names)} classes ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
                   if names else "no classes (one set of images)")
        learned = ("learned (--conditional)" if cfg.CONDITIONAL else
                   "not learned (--no-conditional)") if names else ""
        if cfg.CLUSTERS:
            learned += (", " if learned else "") + (f"the model learns {cfg.CLUSTERS} k-means "
                                                    f"clusters of the images instead (--clusters)")
        subset = (f"; training on the first {cfg.TRAIN_SIZE:,} (--train-size)"
                  if cfg.TRAIN_SIZE else "")
        return (f"data: {data.title}, {data.split or 'its training and test splits'}; "
                f"{classes}{', ' + learned if learned else ''}{subset}")

    def grid_seconds(self, step_seconds: float) -> float:
        """Seconds a sample grid of NUM_SAMPLES takes at `step_seconds` a training step (a
        sampling step of one image costs about a third of a training step's share of it)."""
        cfg = self._config
        evaluations = self.sampling_settings().network_evaluations(cfg.num_classes > 0)
        return cfg.NUM_SAMPLES * evaluations * step_seconds / (3 * cfg.BATCH_SIZE)

    def _evaluation_count(self, seconds: float) -> int:
        """Evaluations the plan expects: one each EVAL_EVERY epochs reached, and one at the end."""
        steps = self.step + seconds / max(self.estimate_step_seconds(), 1e-9)
        epochs = min(self.total_steps, steps) / self.steps_per_epoch
        return int(epochs // self._config.EVAL_EVERY) - self.epoch // self._config.EVAL_EVERY + 1

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
        detached loss (the global batch's) and the flag (the gradient norm is kept for the
        loggers, unread).
        """
        cfg = self._config
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, self._fraction)
        size = x0.shape[0]
        per_image, t = self.per_image_loss(x0, labels)
        loss = per_image.sum() / size  # this process's share of the batch mean
        (loss * dist.world_size()).backward()
        loss = dist.all_reduce_sum_(loss.detach())
        clip = cfg.GRAD_CLIP if cfg.GRAD_CLIP > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = bad.float()  # honoured by fused AdamW, like GradScaler's
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.ema_decay_at(self.step))
            if self.guide_ema is not None:
                torch._foreach_lerp_(self._guide_ema_params, self.params,
                                     1.0 - self._guide_ema_decay(self.step))
            quartile = (t * QUARTILES) // self.model.timesteps
            self._bins[0].index_add_(0, quartile, per_image.detach().double())
            self._bins[1].index_add_(0, quartile, torch.ones_like(quartile, dtype=torch.float64))
        self._grad_norm = grad_norm.detach()
        return loss, bad

    def per_image_loss(self, x0: torch.Tensor, labels: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (per-image losses, their timesteps) of the global batch x0: the
        denoising loss at timesteps and noise drawn for the whole batch (see train_step).
        A distillation run (training/distill.py) replaces this and nothing else."""
        cfg = self._config
        size = x0.shape[0]
        t = self.model.scheduler.sample_timesteps(size, self.device, self.generator,
                                                  cfg.TIMESTEP_SAMPLING)
        noise = torch.randn(x0.shape, device=self.device, dtype=x0.dtype, generator=self.generator)
        # a model without classes ignores the labels (the DataLoader yields them all the same)
        labels = self.drop_labels(labels) if cfg.num_classes else None
        part = dist.local_slice(size)
        x0, t, noise = x0[part], t[part], noise[part]
        labels = None if labels is None else labels[part]
        if cfg.CHANNELS_LAST:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            per_image = self.model.compute_loss(x0, t, noise, reduction="none",
                                                forward=self.forward, labels=labels)
        return per_image, t

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The global batch's labels with each replaced by the "no class" token with
        probability CLASS_DROPOUT (one uniform draw per image from the trainer's generator)."""
        if labels is None:
            raise ValueError("a conditional model needs the images' labels (--conditional)")
        drop = torch.rand(labels.shape, device=self.device, generator=self.generator)
        return torch.where(drop < self._config.CLASS_DROPOUT, self.model.null_label, labels)

    def batches(self):
        """(images, labels) batches without end, epoch after epoch (for benchmarks)."""
        epoch = 0
        while True:
            yield from self.batcher.labelled(epoch)
            epoch += 1

    def estimate_step_seconds(self, repeats: int = 2) -> float:
        """Seconds per optimizer step on this machine, from timing forward and backward on
        a blank batch (on a CPU a smaller one, scaled). Weights, generators and random
        states are left exactly as they were. Measured once per Trainer."""
        if getattr(self, "_step_seconds", None) is not None:
            return self._step_seconds
        cfg = self._config
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
        self._step_seconds = min(times[1:]) * cfg.BATCH_SIZE / batch
        return self._step_seconds

    # ----- the loop -----
    def fit(self) -> dict:
        """Train until the budget (EPOCHS, MAX_STEPS, MAX_MINUTES) is used; returns a
        summary. Raises TrainingInterrupted after writing a checkpoint on SIGINT/SIGTERM,
        TrainingDiverged on repeated non-finite steps."""
        cfg = self._config
        out_dir = Path(cfg.OUTPUT_DIR)
        if not self.stretches or self.stretches[-1]["world_size"] != dist.world_size():
            self.stretches.append({"step": self.step, "world_size": dist.world_size()})
        here = {**machine.record(self.device), "precision": self.precision}
        if not self.machines or {**self.machines[-1], "step": self.step} != {"step": self.step, **here}:
            self.machines.append({"step": self.step, **here})

        def prepare():
            out_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.checkpoint_dir)
            self._write_or_warn("config.json", save_json,
                                {**cfg.to_dict(), "world_size": dist.world_size(),
                                 "stretches": self.stretches}, out_dir / "config.json")
            info = RunInfo(cfg, self.steps_per_epoch, self.step, out_dir)
            for logger in self.loggers:
                logger.start(info)

        dist.wait_for_rank0(prepare)
        n_params = sum(p.numel() for p in self.params)
        self.log(f"training on {self.device} ({self.precision}): {n_params / 1e6:.2f}M parameters, "
                 f"{self.dataset.title}, {self.steps_per_epoch} steps of {cfg.BATCH_SIZE} per "
                 f"epoch, {self.total_steps} steps in all"
                 + (f" or {cfg.MAX_MINUTES:g} minutes of training, whichever comes first"
                    if cfg.MAX_MINUTES else "")
                 + (f", resuming at step {self.step}" if self.step else "")
                 + (f"; {dist.world_size()} processes, {cfg.BATCH_SIZE} images a step in all"
                    if dist.world_size() > 1 else ""))
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=1000, initial=round(1000 * self.progress_fraction(self.elapsed)),
                   unit="", dynamic_ncols=True, disable=not self.progress,
                   bar_format="{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        try:
            self._loop(bar)
        except BaseException:
            self.close()
            raise
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.finish()

    def _loop(self, bar):
        cfg = self._config
        while self.epoch < cfg.EPOCHS and self.step < self.total_steps and not self.timed_out:
            tick, images_done = self.clock(), 0
            for x0, labels in self.batcher.labelled(self.epoch, self.batch_in_epoch):
                self._pending.append((*self.train_step(x0, labels), self._grad_norm))
                self.step += 1
                self.batch_in_epoch += 1
                images_done += x0.shape[0]
                seconds = self.elapsed + (self.clock() - tick)
                stop = self._after_step(seconds)
                bar.update(round(1000 * self.progress_fraction(seconds)) - bar.n)
                if self.step % cfg.PRINT_EVERY == 0 or self.step == self.total_steps:
                    self.elapsed += self._flush(tick, images_done, bar)
                    tick, images_done = self.clock(), 0
                if cfg.SAVE_EVERY_STEPS and self.step % cfg.SAVE_EVERY_STEPS == 0:
                    self.elapsed += self._flush(tick, images_done, bar)
                    tick, images_done = self.clock(), 0
                    dist.wait_for_rank0(lambda: self._save_with_history(
                        self.checkpoint_dir / ckpt.LATEST))
                if stop:
                    self.elapsed += self._flush(tick, images_done, bar)
                    path = self._save_on_stop()
                    raise TrainingInterrupted(self._stop_signal, path)
                if self.step >= self.total_steps or self.timed_out:
                    break
            self.elapsed += self._flush(tick, images_done, bar)
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.end_of_epoch()

    def _after_step(self, seconds: float) -> bool:
        """After each step, with `seconds` of training so far: update the budget fraction
        (for the lr) and the time limit, and say whether a signal asks to stop. Under
        torchrun every process takes the maximum over all, so they all decide alike."""
        limit = self._config.MAX_MINUTES * 60
        stop, timed_out, self._fraction = dist.agree(
            float(self._stop_signal is not None),
            float(bool(limit) and seconds + self._reserve >= limit),
            self.budget_fraction(seconds + self._reserve))
        self.timed_out = bool(timed_out)
        if self.guide_step is None and self._config.GUIDE_AT and self._fraction >= self._config.GUIDE_AT:
            self.keep_guide()
        if stop and self._stop_signal is None:
            self._stop_signal = "SIGTERM"  # another process got it
        return bool(stop)

    def keep_guide(self) -> None:
        """Keep the EMA weights as they are now as autoguidance's guide (Karras et al. 2024:
        a weaker version of the model, here the same one early in its training): the
        checkpoint carries them, `load_model` gives them as `model.guide`. With
        GUIDE_EMA_STD the guide is the run's second EMA, of that width, which then stops."""
        guide = self.guide_ema if self.guide_ema is not None else copy.deepcopy(self.ema)
        self.guide_ema, self._guide_ema_params = None, []
        self.ema.set_guide(guide)
        self.guide_step = self.step

    def sampling_settings(self):
        """The run's sampling settings, without autoguidance while it has no guide yet."""
        settings = for_training(self._config)
        return settings if self.ema.guide is not None else replace(settings, autoguidance=1.0)

    def _flush(self, since: float, images_done: int = 0, bar=None) -> float:
        """Read the pending losses back (one sync), check for divergence, report them to
        the loggers; returns the seconds since `since`."""
        seconds = self.clock() - since
        if not self._pending:
            return seconds
        values = torch.stack([l for l, _, _ in self._pending]).float().tolist()
        flags = torch.stack([b for _, b, _ in self._pending]).tolist()
        last_norm = float(self._pending[-1][2])
        first = self.step - len(values) + 1
        self._pending.clear()
        for i, (value, bad) in enumerate(zip(values, flags)):
            self.losses.append(value)
            self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
            if self.bad_in_a_row >= self._config.MAX_BAD_STEPS:
                raise TrainingDiverged(
                    f"training stopped at step {first + i}: {self.bad_in_a_row} non-finite "
                    f"losses or gradients in a row (skipped, not applied); the last good "
                    f"checkpoint in {self._config.CHECKPOINT_DIR} is untouched. Try a lower "
                    f"--lr or --grad-clip")
        bins = dist.all_reduce_sum_(self._bins.clone()).tolist()
        self._bins.zero_()
        rate = images_done / max(seconds, 1e-9)
        if images_done and not self._measured_reserve:  # until an epoch end measures a save
            self._reserve = self.grid_seconds(seconds / len(values))
        values_out = {"loss": self._recent_loss(len(values)), "lr": self.lr_at(self.step - 1, self._fraction),
                      "ema_decay": self.ema_decay_at(self.step - 1), "grad_norm": last_norm,
                      "images_per_s": rate if images_done else None,
                      "skipped_steps": float(sum(flags))}
        values_out.update({f"loss_q{q}": bins[0][q] / bins[1][q]
                           for q in range(QUARTILES) if bins[1][q]})
        for logger in self.loggers:
            logger.scalars(self.step, values_out)
        if bar is not None:
            bar.set_postfix_str(f"step {self.step:,}, epoch {self.epoch + 1}, loss "
                                f"{self._recent_loss():.4f}"
                                + (f", {rate / self._config.BATCH_SIZE:.1f} steps/s"
                                   if images_done else ""), refresh=False)
        return seconds

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
        """Save (and draw the grid) every SAVE_EVERY epochs, evaluate every EVAL_EVERY. The
        budget is wall time: the saving and drawing count against it (the evaluations do
        not; the plan says so), and grids are skipped at epoch ends while they have taken
        more than GRID_SHARE of the time (the final grid is always drawn)."""
        cfg = self._config
        last = self.epoch >= cfg.EPOCHS
        if self.epoch % cfg.SAVE_EVERY == 0 or last:
            # (a run out of time draws its grid in finish(), straight after)
            draw = not self.timed_out and (last or self._picture_seconds <= GRID_SHARE * self.elapsed)
            if not draw and not self._said_grids:
                self._said_grids = True
                self.log(f"\nnote: the sample grids took over {GRID_SHARE:.0%} of the training "
                         f"time; drawing them at fewer epoch ends (the last one always)")

            def save_all():
                self.save(self.checkpoint_dir / ckpt.periodic_name(self.epoch),
                          self.checkpoint_dir / ckpt.LATEST)
                ckpt.prune_periodic(self.checkpoint_dir, cfg.KEEP)
                if draw:
                    start = self.clock()
                    self._write_or_warn("the sample grid", self.save_samples,
                                        f"samples_epoch_{self.epoch:04d}")
                    self._picture_seconds += self.clock() - start
                self._write_or_warn("the loss history", self.write_history)

            start = self.clock()
            dist.wait_for_rank0(save_all)
            spent = self.clock() - start
            self.elapsed += spent
            if draw:  # the final save draws a grid too: keep that much of the budget for it
                self._reserve = max(self._reserve if self._measured_reserve else 0.0, spent)
                self._measured_reserve = True
        if cfg.EVAL_EVERY and (self.epoch % cfg.EVAL_EVERY == 0 or last):
            self._evaluate_and_record()

    def _evaluate_and_record(self) -> None:
        """Evaluate (after the checkpoint is safe); a failed evaluation is a warning."""
        if self.evaluate() is not None:
            dist.wait_for_rank0(lambda: self._save_with_history(self.checkpoint_dir / ckpt.LATEST,
                                                                force=True))

    def _save_with_history(self, path: Path, force: bool = False) -> Path:
        if force:
            self._latest_step = None
        self.save(path)
        self._write_or_warn("the loss history", self.write_history)
        return path

    def _save_on_stop(self) -> Path:
        """Ctrl-C or SIGTERM: the checkpoint first, then the history and a grid."""
        def save_all():
            path = self.save(self.checkpoint_dir / ckpt.LATEST)
            self._write_or_warn("the loss history", self.write_history)
            self._write_or_warn("the sample grid", self.save_samples, "samples_final")
            return path

        dist.wait_for_rank0(save_all)
        return self.checkpoint_dir / ckpt.LATEST

    def finish(self) -> dict:
        cfg = self._config
        latest = self.checkpoint_dir / ckpt.LATEST
        if self.timed_out:  # the time kept for this final save is the rest of the budget
            self.elapsed = max(self.elapsed, cfg.MAX_MINUTES * 60)

        def save_all():
            self.save(latest)
            wrote = self._write_or_warn("the sample grid", self.save_samples, "samples_final")
            self._write_or_warn("the loss history", self.write_history)
            return wrote

        grid = dist.broadcast_object(dist.wait_for_rank0(save_all))
        if cfg.EVAL_EVERY and (not self.evaluations or self.evaluations[-1]["step"] != self.step):
            self._evaluate_and_record()  # the run stopped between evaluations
        summary = {"step": self.step, "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                   "train_seconds": self.elapsed, "final_loss": self._recent_loss(),
                   "checkpoint": str(latest), "samples": str(grid)}
        if self.evaluations and self.evaluations[-1]["step"] == self.step:
            summary.update({k: v for k, v in self.evaluations[-1].items()
                            if k in ("fid", "confident_fraction", "conditional_accuracy")})
        for logger in self.loggers:
            logger.finish(summary)
            logger.close()
        self.log(f"done: {self.step} steps ({summary['epoch']:.2f} epochs) in "
                 f"{self.elapsed:.0f} s of training; loss {summary['final_loss']:.4f}\n"
                 f"  checkpoint: {latest}\n  samples:    {grid}\n"
                 f"  loss curve: {Path(cfg.OUTPUT_DIR) / 'loss.png'}"
                 + (f"\n  TensorBoard: tensorboard --logdir {Path(cfg.OUTPUT_DIR) / 'tb'}"
                    if cfg.LOG == "tensorboard" else ""))
        return summary

    def close(self) -> None:
        """Close the loggers (fit() does at its end; for a run that stops early)."""
        for logger in self.loggers:
            logger.close()

    def _write_or_warn(self, what: str, write, *args):
        """Run `write(*args)`; a failed write (disk full, I/O error) is reported in one line
        and training goes on: a picture must not kill a run whose checkpoint can be saved."""
        try:
            return write(*args)
        except OSError as error:
            where = next((a for a in args if isinstance(a, Path)), Path(self._config.OUTPUT_DIR))
            self.log(f"warning: could not write {what} to {where}: "
                     f"{ckpt.write_failure(error, Path(self._config.OUTPUT_DIR))}; training goes on")
            return None
        except (ResourceError, KeyboardInterrupt):
            raise
        except Exception as error:  # a picture that cannot be drawn must not cost the run
            self.log(f"warning: could not write {what} ({type(error).__name__}: "
                     f"{first_line(error, 120)}); training goes on")
            return None

    def save_samples(self, name: str) -> Path | None:
        """A grid of EMA samples (one row per class of a conditional run), to the loggers;
        returns the PNG's path."""
        cfg = self._config
        classes = choose_classes(cfg)
        count = -(-cfg.NUM_SAMPLES // len(classes)) * len(classes) if classes else cfg.NUM_SAMPLES
        if getattr(self, "_grid", (None,))[0] != self.step:  # the same weights: the same grid
            self._grid = (self.step, self.ema.sample(
                (count, *self.ema.image_shape), seed=cfg.SEED,
                labels=labels_for(classes, count, device=self.device),
                **self.sampling_settings().sample_kwargs()))
        shown, nrow = arrange(self._grid[1], classes)
        names = row_labels(cfg, classes)
        paths = [logger.images(self.step, name, shown, nrow, names) for logger in self.loggers]
        wanting = [logger for logger in self.loggers if logger.wants_guidance_strip]
        if classes and wanting:  # each class (a row) from one noise, at each scale (columns)
            strip = guidance_strip(self.ema, classes, list(GUIDANCE_STRIP), seed=cfg.SEED)
            for logger in wanting:
                logger.images(self.step, "guidance_strip", strip, len(GUIDANCE_STRIP), names)
        return next((p for p in paths if p is not None), None)


    def write_history(self):
        for logger in self.loggers:
            logger.history(self.losses, self.evaluations)

    def evaluate(self, num_samples: int | None = None) -> dict | None:
        """FID etc. of EVAL_SAMPLES (or num_samples) fixed-seed EMA samples, logged and kept
        in the history; None (and a warning) if the evaluation failed."""
        cfg = self._config
        count = num_samples or cfg.EVAL_SAMPLES
        settings = self.sampling_settings()
        classes = choose_classes(cfg)
        part = dist.local_slice(count)  # each process draws its share of the images
        images = self.ema.generate(part.stop - part.start, first_index=part.start,
                                   progress=self.progress, seed=EVAL_SEED,
                                   labels=labels_for(classes, count, device=self.device)[part]
                                   if classes else None, **settings.sample_kwargs())
        images = dist.gather_to_rank0(images.cpu())
        record = dist.broadcast_object(dist.wait_for_rank0(
            lambda: self._score_or_warn(images, classes, settings.label)))
        if record is not None:
            self.evaluations.append(record)
        return record

    def _score_or_warn(self, images: torch.Tensor, classes, label: str) -> dict | None:
        """Metrics of the gathered images (on rank 0), logged; a failure is one warning line."""
        cfg = self._config
        try:
            if self.evaluator is None:
                self.evaluator = Evaluator(self.dataset, device=self.device,
                                           progress=self.progress, log=self.log)
            labels = labels_for(classes, len(images))
            result = self.evaluator.evaluate(images, memorisation=False, labels=labels)
        except (ResourceError, KeyboardInterrupt):
            raise
        except Exception as error:  # an evaluation must never cost training
            self.log(f"warning: the evaluation at step {self.step} failed ({type(error).__name__}: "
                     f"{first_line(error, 120)}); training goes on")
            return None
        record = {"epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                  "step": self.step, "train_seconds": self.elapsed, "num_samples": len(images),
                  "fid": result["fid"], "sampler": label}
        if "conditional_accuracy" in result:
            record.update(guidance=cfg.GUIDANCE)
        floor = result["floor"]  # (without scores when there were too few real images)
        for key in ("fid", "confident_fraction", "class_kl", "precision", "recall",
                    "conditional_accuracy"):
            if key in result and key != "fid":
                record[key] = result[key]
            if key in result and key in floor:
                record[f"{key}_floor"] = floor[key]
        for logger in self.loggers:
            logger.evaluation(self.step, record)
        return record

    # ----- checkpoint state -----
    def state_dict(self) -> dict:
        return {
            "config": self._config.to_dict(),
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
            "machines": self.machines,
            "rng": capture_rng_state(),
            **({"guide": self.ema.guide.state_dict(), "guide_step": self.guide_step}
               if self.ema.guide is not None else {}),
            **({"guide_ema": self.guide_ema.state_dict()} if self.guide_ema is not None else {}),
            **({"clusters": self.cluster_ids.to(torch.int32)}
               if self.cluster_ids is not None else {}),
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
            if self.guide_ema is not None and "guide_ema" in state:
                self.guide_ema.load_state_dict(state["guide_ema"])
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
        self.machines = [dict(m) for m in state.get("machines", [])]
        if isinstance(state.get("guide"), dict):
            self.keep_guide()
            self.ema.guide.load_state_dict(state["guide"])
            self.guide_step = int(state["guide_step"])
        try:
            self.generator.set_state(state["generator"].cpu())
        except RuntimeError:  # saved on another kind of device: a fresh stream, seeded
            self.generator.manual_seed(self._config.SEED + 1 + self.step)
        restore_rng_state(state["rng"])

