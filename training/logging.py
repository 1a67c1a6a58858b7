"""Where a run's numbers and pictures go: one interface, one class per backend.

The trainer reports each event once, to every logger of the run (rank 0 only):

    start(run)                      the run's config, its folders, where it resumes
    scalars(step, values)           every PRINT_EVERY steps: loss, loss by timestep
                                    quartile, learning rate, EMA decay, gradient norm,
                                    images/s, non-finite steps skipped
    evaluation(step, record)        FID and the rest, beside their floors (--eval-every)
    images(step, name, images, nrow, row_labels)  a grid of samples, rows named if given;
                                    also the guidance strip ("guidance_strip": rows are
                                    classes, columns GUIDANCE_STRIP) of a conditional run,
                                    for loggers whose wants_guidance_strip is True
    history(losses, evaluations)    at every checkpoint: the whole record so far
    finish(summary)                 the final metrics
    close()

`FilesLogger` is the record every run keeps: console lines, loss_history.csv, loss.png,
evaluations.json, training_curves.png and the sample grids as PNG, in the run's output
folder. `TensorBoardLogger` (--log tensorboard) writes the same events as TensorBoard
event files in <run>/tb/. A new backend is one more class here and one line in
`make_loggers`.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config
from utils.errors import UsageError
from utils.files import atomic_write, save_json
from utils.visualization import (plot_loss, plot_training_curves, save_images,
                                 save_labelled_grid)


GUIDANCE_STRIP = (0.0, 1.0, 2.0, 4.0)  # the guidance strip's scales: no class ... strong


@dataclass(frozen=True)
class RunInfo:
    config: Config
    steps_per_epoch: int
    start_step: int  # 0 for a new run; where a resumed run continues
    output_dir: Path


class RunLogger:
    """A backend; every method is optional (does nothing here)."""

    wants_guidance_strip = False  # True: the trainer draws the strip (a cost) for this one

    def start(self, run: RunInfo) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def evaluation(self, step: int, record: dict) -> None: ...
    def images(self, step: int, name: str, images: torch.Tensor, nrow: int,
               row_labels: list[str] | None = None) -> Path | None: ...
    def history(self, losses: list[float], evaluations: list[dict]) -> None: ...
    def finish(self, summary: dict) -> None: ...
    def close(self) -> None: ...


class FilesLogger(RunLogger):
    """Console lines, CSV, JSON and plots in the run's output folder (the default)."""

    def __init__(self, log=print):
        self.log = log
        self.run: RunInfo | None = None

    def start(self, run: RunInfo) -> None:
        self.run = run

    def evaluation(self, step: int, record: dict) -> None:
        accuracy = record.get("conditional_accuracy")
        floor = f" (floor {record['fid_floor']:.2f})" if "fid_floor" in record else ""
        self.log(f"step {step:,} (epoch {record['epoch']:.2f}): FID {record['fid']:.2f}"
                 f"{floor} on {record['num_samples']} samples"
                 + (f", {100 * record['confident_fraction']:.1f}% with p > 0.9, class KL "
                    f"{record['class_kl']:.4f}" if "confident_fraction" in record else "")
                 + (f", recall {record['recall']:.3f}" + (f" (floor {record['recall_floor']:.3f})"
                                                           if "recall_floor" in record else "")
                    if "recall" in record else "")
                 + (f", {100 * accuracy:.1f}% the class asked for (guidance "
                    f"{record['guidance']:g})" if accuracy is not None else ""))

    def images(self, step: int, name: str, images: torch.Tensor, nrow: int,
               row_labels: list[str] | None = None) -> Path:
        path = self.run.output_dir / f"{name}.png"
        if row_labels:
            return save_labelled_grid(images, path, nrow, [""] * nrow, row_labels=row_labels)
        return save_images(images, path, nrow=nrow)

    def history(self, losses: list[float], evaluations: list[dict]) -> None:
        out, per_epoch, config = self.run.output_dir, self.run.steps_per_epoch, self.run.config

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["step", "epoch", "loss"])
                for i, value in enumerate(losses):
                    writer.writerow([i + 1, f"{(i + 1) / per_epoch:.4f}", f"{value:.6g}"])

        atomic_write(out / "loss_history.csv", write_csv)
        if losses:
            plot_loss(losses, out / "loss.png", steps_per_epoch=per_epoch,
                      title=f"training loss ({config.MODEL_CHANNELS} channels, "
                            f"batch {config.BATCH_SIZE})")
        if evaluations:
            save_json({"evaluations": evaluations}, out / "evaluations.json")
            plot_training_curves(losses, evaluations, out / "training_curves.png", per_epoch)


class TensorBoardLogger(RunLogger):
    """TensorBoard event files in <run>/tb/ (open with: tensorboard --logdir runs)."""

    wants_guidance_strip = True

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.writer = None
        self._last_image: dict[str, int] = {}

    def start(self, run: RunInfo) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--log tensorboard writes its event files into the folder "
                             f"{self.folder}, but a file has that name; move it away")
        # imported here, not at the top: the package is optional and takes a second to load
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops what a killed process logged past its checkpoint
        # (steps after start_step), so that no step appears twice
        self.writer = SummaryWriter(str(self.folder),
                                    purge_step=run.start_step + 1 if run.start_step else None)
        self.config = run.config
        if not run.start_step:
            self.writer.add_text("config", _config_table(run.config), 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def evaluation(self, step: int, record: dict) -> None:
        for key in ("fid", "confident_fraction", "recall", "precision", "conditional_accuracy",
                    "class_kl"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"eval/{key}", record[key], step)
            floor = record.get(f"{key}_floor")
            if floor is not None:
                self.writer.add_scalar(f"eval/{key}_floor", floor, step)

    def images(self, step: int, name: str, images: torch.Tensor, nrow: int,
               row_labels: list[str] | None = None) -> None:
        tag = "samples" if name.startswith("samples") else name  # one tag, a slider over steps
        if self._last_image.get(tag) == step:  # the final grid of an epoch's last step
            return
        self._last_image[tag] = step
        from torchvision.utils import make_grid  # imported when needed: it takes seconds

        grid = make_grid(((images.float().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=2,
                         pad_value=0.35)
        self.writer.add_image(tag, grid, step)

    def finish(self, summary: dict) -> None:
        metrics = {f"final/{k}": v for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in self.config.to_dict().items()}
        self.writer.add_hparams(hparams, metrics, run_name="hparams")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _config_table(config: Config) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in config.to_dict().items())
    return "| setting | value |\n|---|---|\n" + rows


def make_loggers(config: Config, log=print) -> list[RunLogger]:
    loggers: list[RunLogger] = [FilesLogger(log)]
    if config.LOG == "tensorboard":
        loggers.append(TensorBoardLogger(Path(config.OUTPUT_DIR) / "tb"))
    return loggers


__all__ = ["GUIDANCE_STRIP", "RunLogger", "FilesLogger", "TensorBoardLogger", "RunInfo",
           "make_loggers"]
