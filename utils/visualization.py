"""Pictures: sample grids, loss and metric curves, the forward and reverse processes.

Everything renders off-screen (matplotlib's Agg backend, Pillow), so it works on a
headless machine and nothing waits for a window; `show` opens one only when asked.
Every file is written atomically (utils.files): a full disk or a kill leaves the old
picture or none, never a broken one.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from utils.data_loader import denormalize_images  # noqa: E402
from utils.files import atomic_write  # noqa: E402


PADDING = 2  # pixels between the images of a grid (and around it)


def _pyplot():
    """matplotlib.pyplot, imported when a figure is drawn: it takes about a second, which
    every process that draws no plot (`--help`, sampling to PNG grids) is spared."""
    import matplotlib.pyplot as plt

    return plt


def _figure(figsize, ncols: int = 1):
    """A figure outside pyplot's registry: closing pyplot figures runs the garbage
    collector (a third of a second in a process holding a model), written ones need none."""
    from matplotlib.figure import Figure  # imported when needed, as pyplot is

    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save_figure(fig, path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=fig.dpi, format="png"))


def grid_image(images: torch.Tensor, nrow: int = 8, normalize: bool = True,
               scale: int = 2) -> Image.Image:
    """(N, C, H, W) images -> one PIL image; normalize=True maps [-1, 1] to [0, 1]."""
    images = images.detach().float().cpu()
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if normalize:
        images = denormalize_images(images)
    from torchvision.utils import make_grid  # imported when needed: torchvision takes seconds

    grid = make_grid(images.clamp(0, 1), nrow=nrow, padding=PADDING, pad_value=0.35)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array[:, :, 0] if images.shape[1] == 1 else array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_images(images: torch.Tensor, filepath, nrow: int = 8, normalize: bool = True,
                scale: int = 2) -> Path:
    """Save (N, C, H, W) images as one PNG grid of `nrow` images per row."""
    picture = grid_image(images, nrow, normalize, scale)
    return atomic_write(filepath, lambda tmp: picture.save(tmp, format="PNG"))


def plot_images(images: torch.Tensor, title: str = "", nrow: int = 4, figsize=(10, 10),
                normalize: bool = True, save_path=None, show: bool = False):
    """Draw (N, C, H, W) images as a grid of `nrow` per row in a matplotlib figure of
    `figsize` inches (None: sized to the grid); save it and/or show it. normalize=True
    maps [-1, 1] to [0, 1]. Returns the grid as a PIL image."""
    picture = grid_image(images, nrow, normalize, scale=1)
    if figsize is None:
        figsize = (max(3, picture.width / 40), max(3, picture.height / 40))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(np.asarray(picture), cmap="gray", vmin=0, vmax=255)
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    fig.set_dpi(100)
    if save_path is not None:
        atomic_write(save_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    if show:
        plt.show()
    plt.close(fig)
    return picture


def display_available() -> bool:
    """True when matplotlib can show a figure to someone: a notebook's inline backend or a
    GUI backend; False for the off-screen ones (Agg, set above on a headless run)."""
    backend = matplotlib.get_backend().lower()
    return backend not in {"agg", "pdf", "ps", "svg", "cairo", "pgf", "template"}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_loss(losses, save_path, title: str = "Training loss", steps_per_epoch: int | None = None):
    """Per-step losses (log scale) with a moving average; x in epochs if steps_per_epoch."""
    losses = np.asarray(losses, dtype=np.float64)
    fig, ax = _figure((7, 4))
    _draw_loss(ax, losses, steps_per_epoch)
    ax.set_title(title)
    fig.tight_layout()
    fig.set_dpi(100)
    _save_figure(fig, save_path)


def _draw_loss(ax, losses: np.ndarray, steps_per_epoch: int | None):
    x = np.arange(1, len(losses) + 1, dtype=np.float64)
    unit = "step"
    if steps_per_epoch:
        x, unit = x / steps_per_epoch, "epoch"
    window = max(1, min(200, len(losses) // 20))
    ax.plot(x, losses, color="tab:blue", alpha=0.25, linewidth=0.6, label="per step")
    if window > 1:
        ax.plot(x[window - 1:], _smooth(losses, window), color="tab:blue",
                label=f"mean of {window} steps")
    ax.set_yscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def plot_training_curves(losses, evaluations: list[dict], save_path, steps_per_epoch: int,
                         title: str = ""):
    """Loss curve beside the evaluation metrics (FID, confident fraction) against epochs."""
    fig, axes = _figure((12, 4), 2)
    _draw_loss(axes[0], np.asarray(losses, dtype=np.float64), steps_per_epoch)
    axes[0].set_title("training loss")
    if evaluations:
        epochs = [e["epoch"] for e in evaluations]
        axes[1].plot(epochs, [e["fid"] for e in evaluations], "o-", color="tab:red", label="FID")
        if "fid_floor" in evaluations[-1]:
            axes[1].axhline(evaluations[-1]["fid_floor"], color="tab:red", linestyle=":",
                            label="floor (real train digits)")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("FID (classifier features)")
        twin = axes[1].twinx()
        twin.plot(epochs, [100 * e["confident_fraction"] for e in evaluations], "s--",
                  color="tab:green", label="% with p > 0.9")
        twin.set_ylabel("% samples classified with p > 0.9")
        twin.set_ylim(0, 100)
        lines = axes[1].get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        axes[1].legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
        n = evaluations[-1].get("num_samples")
        axes[1].set_title(f"evaluation ({n} samples)" if n else "evaluation")
    axes[1].set_xlabel("epoch")
    axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.set_dpi(100)
    _save_figure(fig, save_path)


def save_labelled_grid(images: torch.Tensor, save_path, ncol: int, column_labels: list[str],
                       title: str = "", row_labels: list[str] | None = None) -> Path:
    """A grid (row-major, `ncol` per row) with a label over each column (and, if given,
    beside each row), via matplotlib."""
    picture = np.asarray(grid_image(images, nrow=ncol, scale=1))
    cell = (picture.shape[1] - PADDING) / ncol  # an image and the padding after it
    rows = round((picture.shape[0] - PADDING) / cell)
    centre = PADDING + (cell - PADDING) / 2
    fig, ax = _figure((max(4.0, 0.75 * ncol), 0.75 * rows + 0.6))
    ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([centre + cell * i for i in range(ncol)], column_labels, fontsize=8)
    ax.xaxis.tick_top()
    names = (list(row_labels or []) + [""] * rows)[:rows] if row_labels else []
    ax.set_yticks([centre + cell * i for i in range(rows)] if names else [], names, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10, pad=18)
    fig.tight_layout()
    fig.set_dpi(110)
    return _save_figure(fig, save_path)


@torch.no_grad()
def visualize_diffusion_process(model, x0: torch.Tensor,
                                timesteps_to_show=(0, 100, 300, 500, 700, 999),
                                save_path=None, seed: int = 0) -> torch.Tensor:
    """The forward process q(x_t | x_0): one row per image of x0, one column per timestep.

    Returns the (rows * columns, C, H, W) images in [-1, 1]; saves a PNG if save_path.
    """
    device = model.scheduler.betas.device
    x0 = x0.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    columns = [x0]
    for t in timesteps_to_show:
        t = min(int(t), model.timesteps - 1)
        tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
        columns.append(model.forward_diffusion(x0, tt, noise)[0])
    images = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: image, then timestep
    if save_path is not None:
        labels = ["x0"] + [f"t={min(int(t), model.timesteps - 1)}" for t in timesteps_to_show]
        save_labelled_grid(images, save_path, len(columns), labels,
                           "forward process q(x_t | x_0): noise added to test digits")
    return images


def save_chain(frames: list[torch.Tensor], save_path, labels: list[str], title: str = "") -> Path:
    """A chain x_T -> x_0 as a grid: one row per sample, one labelled column per frame."""
    images = torch.stack(frames, dim=1).flatten(0, 1)
    return save_labelled_grid(images, save_path, len(frames), labels, title)


def save_gif(frames: list[torch.Tensor], save_path, nrow: int = 8, duration_ms: int = 60,
             hold_last_ms: int = 1500) -> Path:
    """An animated GIF with one frame per entry of `frames` (each a batch of images)."""
    pictures = [grid_image(batch, nrow=nrow, scale=3) for batch in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    return atomic_write(save_path, lambda tmp: pictures[0].save(
        tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations,
        loop=0, optimize=False))


def show(path) -> None:
    """Open a PNG in a window if this machine has a display; otherwise say where it is."""
    try:
        plt = _pyplot()
        plt.switch_backend("TkAgg")
        image = plt.imread(str(path))
        plt.figure(figsize=(6, 6))
        plt.imshow(image, cmap="gray")
        plt.axis("off")
        plt.show()
    except Exception as error:  # no display, no Tk: the file is still there
        print(f"could not open a window ({type(error).__name__}); the image is at {path}")
