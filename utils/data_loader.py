"""MNIST, offline-first: a torchvision DataLoader, and a faster in-memory batcher.

The four gzipped IDX files ship with the repo in data/MNIST/raw (MNIST by Yann LeCun,
Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0). On first use each .gz is
checked against its published SHA-256 and unpacked beside itself (atomically), where
torchvision finds it and touches no network. A corrupt, truncated or foreign file is
`MNISTDataError`, one line naming the file and what to do; with neither the files nor
a network, `MNISTNotFoundError` says which files to put where.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import socket
from pathlib import Path

import torch

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# SHA-256 of the published .gz files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "6a66d24619f2f5633797ce4489282550aba52f3cbf59f1cec68071891b89629f",
    "train-labels-idx1-ubyte.gz": "ad50e16eb3891898af0c17b35330f2fbbb58a13ed40cd84e07748b00b40978fd",
    "t10k-images-idx3-ubyte.gz": "7ef01df1b8076800fbef9d8ffce81dcb88b0e74a03d0f4d383efdbf9c7aca9de",
    "t10k-labels-idx1-ubyte.gz": "b01a3a89ac78ea4f9e51ac67fc406ed1ffad9c25d47fd3e0abec28338606c207",
}
# Size and first 8 bytes (IDX magic number and item count) of each unpacked file.
MNIST_LAYOUT = {
    "train-images-idx3-ubyte": (47_040_016, bytes.fromhex("00000803 0000ea60")),
    "train-labels-idx1-ubyte": (60_008, bytes.fromhex("00000801 0000ea60")),
    "t10k-images-idx3-ubyte": (7_840_016, bytes.fromhex("00000803 00002710")),
    "t10k-labels-idx1-ubyte": (10_008, bytes.fromhex("00000801 00002710")),
}
FIX = "restore it with `git checkout -- data/MNIST/raw` or copy the original file there"


class MNISTError(RuntimeError):
    """MNIST cannot be read; the message is one line naming the file and what to do."""


class MNISTNotFoundError(MNISTError):
    """The MNIST files are not on disk and could not be downloaded."""


class MNISTDataError(MNISTError):
    """An MNIST file is there but corrupt, truncated or not the published file."""


def raw_folder(data_dir) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_unpacked(path: Path) -> None:
    """Size and IDX header of an unpacked file (cheap: no hashing of 47 MB on every run)."""
    size, header = MNIST_LAYOUT[path.name]
    actual = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
    if actual != size or start != header:
        what = (f"{actual:,} bytes instead of {size:,} (truncated?)" if actual != size
                else "its header is not MNIST's")
        raise MNISTDataError(f"MNIST file {path} is damaged: {what}; delete it so that it is "
                             f"unpacked again from its .gz, or {FIX}")


def _unpack(packed: Path, target: Path) -> None:
    """Verify `packed` against its published SHA-256, then gunzip it to `target` atomically."""
    expected = MNIST_SHA256[packed.name]
    if _sha256(packed) != expected:
        raise MNISTDataError(f"MNIST file {packed} does not match its published SHA-256 "
                             f"(corrupt, truncated or a different file); {FIX}")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        os.replace(tmp, target)
    except (OSError, EOFError) as error:
        raise MNISTDataError(f"could not unpack {packed} to {target} "
                             f"({getattr(error, 'strerror', None) or error})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _missing(raw: Path) -> list[str]:
    """Unpack (verified) .gz copies where the plain file is absent; check every file
    present; return the names still missing."""
    for name in MNIST_FILES:
        packed = raw / (name + ".gz")
        if not (raw / name).exists() and packed.exists():
            _unpack(packed, raw / name)
        if (raw / name).exists():
            _check_unpacked(raw / name)
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
            + ("this machine could not download them" if download else
               "--no-download: no download was tried"))
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
    With `labels` (the digits' classes), `labelled` yields them beside the images.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, device="cpu",
                 labels: torch.Tensor | None = None):
        assert images.dtype == torch.uint8 and images.dim() == 3, (images.dtype, images.shape)
        assert labels is None or labels.shape == images.shape[:1], (labels.shape, images.shape)
        self.images = images.to(device)
        self.labels = None if labels is None else labels.long().to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.images.shape[0] // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.images.shape[0], generator=generator).to(self.device)

    def labelled(self, epoch: int, start: int = 0):
        """Yield (images, labels) of `epoch` from batch number `start`; labels are None
        when the batcher was built without them."""
        order = self.order(epoch)
        for i in range(start, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            labels = None if self.labels is None else self.labels[index]
            yield normalize_images(self.images[index]).unsqueeze(1), labels

    def batches(self, epoch: int, start: int = 0):
        """Yield the batches of `epoch`, beginning at batch number `start`."""
        for images, _ in self.labelled(epoch, start):
            yield images


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

    def labelled(self, epoch: int, start: int = 0):
        """Yield (images, labels) of `epoch` from batch number `start`."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        sampler = order[start * self.batch_size:]
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                             sampler=sampler, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def batches(self, epoch: int, start: int = 0):
        for images, _ in self.labelled(epoch, start):
            yield images
