"""MNIST, offline-first: a torchvision DataLoader, and a faster in-memory batcher.

torchvision finds the four IDX files in DATA_DIR/MNIST/raw and then touches no
network. Gzipped copies (*.gz) there are unpacked on first use. With neither the
files nor a network, `MNISTNotFoundError` says which files to put where.
"""
from __future__ import annotations

import gzip
import shutil
import socket
from pathlib import Path

import torch

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTNotFoundError(RuntimeError):
    """The MNIST files are not on disk and could not be downloaded."""


def raw_folder(data_dir) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _missing(raw: Path) -> list[str]:
    for name in MNIST_FILES:  # unpack gzipped copies placed beside the expected names
        packed = raw / (name + ".gz")
        if not (raw / name).exists() and packed.exists():
            with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return [name for name in MNIST_FILES if not (raw / name).exists()]


def ensure_mnist(data_dir="./data", download: bool = True) -> Path:
    """Make sure the four MNIST files are in data_dir/MNIST/raw; return that folder.

    Tries torchvision's download only when files are missing and download is True.
    """
    raw = raw_folder(data_dir)
    missing = _missing(raw)
    if missing and download:
        import torchvision

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            torchvision.datasets.MNIST(root=str(data_dir), train=True, download=True)
        except Exception:  # no network, a mirror down, a proxy: all end in the same advice
            pass
        finally:
            socket.setdefaulttimeout(previous)
        missing = _missing(raw)
    if missing:
        raise MNISTNotFoundError(
            f"MNIST not found: put the four files {', '.join(MNIST_FILES)} "
            f"(or their .gz) in {raw.resolve()} (missing: {', '.join(missing)}); "
            f"this machine could not download them")
    return raw


def load_mnist(data_dir="./data", train: bool = True, download: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw digits as (uint8 images (N, 28, 28), int64 labels (N,))."""
    import torchvision

    ensure_mnist(data_dir, download)
    dataset = torchvision.datasets.MNIST(root=str(data_dir), train=train, download=False)
    return dataset.data, dataset.targets


def get_mnist_dataloader(data_dir="./data", batch_size: int = 128, train: bool = True,
                         download: bool = True, shuffle: bool | None = None,
                         num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A torchvision DataLoader of (images in [-1, 1] of shape (B, 1, 28, 28), labels)."""
    import torchvision
    from torchvision import transforms

    ensure_mnist(data_dir, download)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = torchvision.datasets.MNIST(root=str(data_dir), train=train, transform=transform,
                                         download=False)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       shuffle=train if shuffle is None else shuffle,
                                       num_workers=num_workers, drop_last=False)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images * 2.0 - 1.0


def denormalize_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images of shape (N, 1, H, W) or (N, H, W) -> uint8 (N, H, W), 0 = black."""
    if images.dim() == 4:
        images = images[:, 0]
    return (denormalize_images(images) * 255.0).round().to(torch.uint8)


class InMemoryBatcher:
    """The whole training set as one uint8 tensor on the device, batched by indexing.

    Epoch e visits every image exactly once, in an order drawn from (seed, e) alone, so
    a resumed run can skip to any batch of any epoch. Batches come out as float images
    in [-1, 1] of shape (B, 1, 28, 28); the last batch of an epoch may be smaller.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, device="cpu"):
        assert images.dtype == torch.uint8 and images.dim() == 3, (images.dtype, images.shape)
        self.images = images.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.images.shape[0] // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.images.shape[0], generator=generator).to(self.device)

    def batches(self, epoch: int, start: int = 0):
        """Yield the batches of `epoch`, beginning at batch number `start`."""
        order = self.order(epoch)
        for i in range(start, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield normalize_images(self.images[index]).unsqueeze(1)


class DataLoaderBatcher:
    """The classic pipeline, for comparison: torchvision's dataset with per-image PIL
    transforms behind a DataLoader, batches copied to the device. Same interface and
    the same per-epoch seeded order as InMemoryBatcher (so resume stays exact), only slower.
    """

    def __init__(self, data_dir, batch_size: int, seed: int = 0, device="cpu",
                 train_size: int = 0, num_workers: int = 0, download: bool = True):
        import torchvision
        from torchvision import transforms

        ensure_mnist(data_dir, download)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        dataset = torchvision.datasets.MNIST(root=str(data_dir), train=True, transform=transform,
                                             download=False)
        if train_size:
            dataset = torch.utils.data.Subset(dataset, range(train_size))
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.num_workers = num_workers

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def batches(self, epoch: int, start: int = 0):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        sampler = order[start * self.batch_size:]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                             sampler=sampler, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for images, _ in loader:
            yield images.to(self.device, non_blocking=True)
