"""Training batches and image conversions, for any registered dataset (utils/datasets/).

`InMemoryBatcher` keeps the whole training set as one uint8 tensor on the device and
batches it by indexing with a seeded permutation per epoch (fast; no workers);
`DataLoaderBatcher` is the classic torchvision pipeline (per-image transforms behind a
DataLoader) in the same order, for comparison. Images are uint8 (N, C, H, W) on disk
and in memory, float in [-1, 1] in the model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from utils.datasets import Dataset, open_dataset  # noqa: F401  (the one way in)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] or float in [0, 1] -> float in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images * 2.0 - 1.0


def denormalize_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1], (N, C, H, W) -> uint8 (N, C, H, W), 0 = black."""
    return (denormalize_images(images.float()) * 255.0).round().to(torch.uint8)


def as_image_batch(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) greyscale -> (N, 1, H, W); (N, C, H, W) as it is."""
    return images.unsqueeze(1) if images.dim() == 3 else images


def get_mnist_dataloader(data_dir="./data", batch_size: int = 128, train: bool = True,
                         download: bool = True, shuffle: bool | None = None,
                         num_workers: int = 0) -> torch.utils.data.DataLoader:
    """MNIST as a DataLoader of (images (B, 1, 28, 28) in [-1, 1], labels (B,)), through
    torchvision's per-image transforms: the design's loader, for notebooks and one's own
    loops (the trainer batches from memory instead, `InMemoryBatcher`).

    data_dir: where MNIST/raw is; "./data" (the design's default), when the working folder
    has no MNIST there, means the repo's own data/ (the shipped files), so this works from
    any folder. train: the 60,000 training digits, else the 10,000 test digits (shuffled
    unless `shuffle` says otherwise only when training). Missing files without a network
    raise DataNotFoundError naming the four files and where they go."""
    folder = None if data_dir in (None, "", "./data", "data") and not \
        (Path(data_dir or "data") / "MNIST" / "raw").is_dir() else data_dir
    images, labels = open_dataset("mnist", folder, download).load("train" if train else "test")
    return torch.utils.data.DataLoader(_PerImage(images, labels), batch_size=batch_size,
                                       shuffle=train if shuffle is None else shuffle,
                                       num_workers=num_workers)


class InMemoryBatcher:
    """The whole training set as one uint8 tensor on the device, batched by indexing.

    Epoch e visits every image exactly once, in an order drawn from (seed, e) alone, so
    a resumed run can skip to any batch of any epoch. Batches come out as float images
    in [-1, 1] of shape (B, C, H, W); the last batch of an epoch may be smaller.
    With `labels` (the images' classes), `labelled` yields them beside the images.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, device="cpu",
                 labels: torch.Tensor | None = None):
        images = as_image_batch(images)
        assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
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
            yield normalize_images(self.images[index]), labels

    def batches(self, epoch: int, start: int = 0):
        """Yield the batches of `epoch`, beginning at batch number `start`."""
        for images, _ in self.labelled(epoch, start):
            yield images


class _PerImage(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images through torchvision's per-image PIL transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels
        channels = images.shape[1]
        from torchvision import transforms  # imported when needed: it takes seconds

        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize((0.5,) * channels,
                                                                  (0.5,) * channels)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        array = self.images[i].permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        return self.transform(picture), self.labels[i]


class DataLoaderBatcher:
    """The classic pipeline, for comparison: per-image PIL transforms behind a
    DataLoader, batches copied to the device. Same interface and the same per-epoch
    seeded order as InMemoryBatcher (so resume stays exact), only slower."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 seed: int = 0, device="cpu", num_workers: int = 0):
        self.dataset = _PerImage(as_image_batch(images), labels)
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
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                             sampler=order[start * self.batch_size:],
                                             num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def batches(self, epoch: int, start: int = 0):
        for images, _ in self.labelled(epoch, start):
            yield images
