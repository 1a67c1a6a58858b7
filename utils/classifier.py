"""The evaluation classifier: a LeNet-style CNN the repo trains itself, offline.

Inception-v3 FID needs weights from the internet and was never meant for 28x28
grey digits. Instead the repo trains this small CNN on the MNIST training set on
first use (deterministic from a seed, a few minutes on a CPU), checks its test
accuracy, and caches it in the checkpoint folder. Its 128-d penultimate layer is
the feature space of the FID in utils/metrics.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.checkpoint import atomic_save
from utils.data_loader import load_mnist, normalize_images

FORMAT = "mnist-classifier"
VERSION = 1
FEATURE_DIM = 128
MIN_ACCURACY = 0.99


class MNISTClassifier(nn.Module):
    """conv5x5(32) - pool - conv5x5(64) - pool - fc(128) - fc(10), with batch norm.

    Input: (B, 1, 28, 28) in [-1, 1]. forward -> logits (B, 10); features -> (B, 128).
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, device="cpu",
                     progress: bool = True) -> MNISTClassifier:
    """Train on uint8 images (N, 28, 28); deterministic from `seed`.

    Small random shifts (up to 2 pixels) make it robust to off-centre digits.
    The global random state is left as it was.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = MNISTClassifier().to(device)
        generator = torch.Generator().manual_seed(seed)
        x_all = normalize_images(images).unsqueeze(1).to(device)
        y_all = labels.to(device)
        steps = epochs * -(-len(x_all) // batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
        model.train()
        bar = tqdm(total=steps, desc="training classifier", unit="step", disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(len(x_all), generator=generator).to(device)
            for i in range(0, len(x_all), batch_size):
                index = order[i:i + batch_size]
                x = _random_shift(x_all[index], generator)
                loss = F.cross_entropy(model(x), y_all[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
        bar.close()
    return model.eval()


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift the whole batch by one random (dy, dx), filling with background (-1)."""
    dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


@torch.no_grad()
def predict(model: MNISTClassifier, images: torch.Tensor, batch_size: int = 1000,
            progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 128), class probabilities (N, 10)) in float64 on the CPU.

    images: uint8 (N, 28, 28) or float (N, 1, 28, 28) in [-1, 1].
    """
    device = next(model.parameters()).device
    model.eval()
    features, probs = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        x = images[i:i + batch_size]
        x = normalize_images(x).unsqueeze(1) if x.dtype == torch.uint8 else x.float()
        f = model.features(x.to(device))
        features.append(f.double().cpu())
        probs.append(F.softmax(model.head(f), dim=1).double().cpu())
    return torch.cat(features), torch.cat(probs)


def accuracy(model: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, probs = predict(model, images)
    return (probs.argmax(1) == labels.cpu()).double().mean().item()


def classifier_path(checkpoint_dir, seed: int = 0, train_size: int | None = None,
                    epochs: int = 3) -> Path:
    suffix = "" if train_size is None and epochs == 3 else f"_n{train_size}_e{epochs}"
    return Path(checkpoint_dir) / f"mnist_classifier_seed{seed}{suffix}.pt"


def load_or_train_classifier(data_dir="./data", checkpoint_dir="./checkpoints", device="cpu",
                             seed: int = 0, train_size: int | None = None, epochs: int = 3,
                             require_accuracy: bool = True, progress: bool = True,
                             log=print, download: bool = True) -> tuple[MNISTClassifier, dict]:
    """The cached classifier, or a newly trained one (then cached). Returns (model, info);
    info has 'test_accuracy', 'seed', 'train_size', 'epochs' and 'path'.

    train_size and epochs below the defaults are for fast tests; the full setting must
    reach MIN_ACCURACY on the test set or a RuntimeError says so.
    """
    path = classifier_path(checkpoint_dir, seed, train_size, epochs)
    model = MNISTClassifier()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") == FORMAT and state.get("version") == VERSION:
                model.load_state_dict(state["model"])
                info = {k: state[k] for k in ("test_accuracy", "seed", "train_size", "epochs")}
                return model.to(device).eval(), {**info, "path": str(path)}
        except Exception as error:  # a stale or broken cache is simply retrained
            log(f"ignoring unreadable classifier cache {path} ({type(error).__name__})")
    images, labels = load_mnist(data_dir, train=True, download=download)
    if train_size is not None:
        images, labels = images[:train_size], labels[:train_size]
    log(f"training the evaluation classifier on {len(images)} MNIST digits "
        f"({epochs} epochs, seed {seed}); it is cached in {path}")
    start = time.time()
    model = train_classifier(images, labels, epochs=epochs, seed=seed, device=device,
                             progress=progress)
    test_images, test_labels = load_mnist(data_dir, train=False, download=download)
    acc = accuracy(model, test_images, test_labels)
    log(f"evaluation classifier: test accuracy {100 * acc:.2f}% "
        f"(trained in {time.time() - start:.0f} s on {device})")
    if require_accuracy and train_size is None and acc < MIN_ACCURACY:
        raise RuntimeError(f"the evaluation classifier reached only {100 * acc:.2f}% test "
                           f"accuracy (needs {100 * MIN_ACCURACY:.0f}%); not cached")
    info = {"test_accuracy": acc, "seed": seed, "train_size": train_size or len(images),
            "epochs": epochs}
    atomic_save({"format": FORMAT, "version": VERSION, "model": model.state_dict(), **info}, path)
    return model.to(device).eval(), {**info, "path": str(path)}
