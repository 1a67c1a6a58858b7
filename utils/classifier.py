"""The evaluation classifier: a LeNet-style CNN, shipped with the repo, whose features define FID.

Inception-v3 FID needs weights from the internet and was never meant for 28x28
grey digits. Instead the repo ships this small CNN, trained once on the MNIST
training set (deterministic: CPU, seed 0, 2 threads), in utils/weights/. Its
SHA-256 is recorded below and checked on every load, so that an FID means the same
on every machine; its 128-d penultimate layer is the feature space of the FID in
utils/metrics.py.

    python -m utils.classifier             # check the shipped weights: hash, test accuracy
    python -m utils.classifier --retrain   # train them again; prints the new hash to record

Tests may train a quick classifier on a subset instead (`load_or_train_classifier`
with a train_size), cached in a folder of their choice.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
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

# The shipped weights and their SHA-256 (printed by `python -m utils.classifier --retrain`).
WEIGHTS = Path(__file__).resolve().parent / "weights" / "mnist_classifier.pt"
WEIGHTS_SHA256 = "7e789769d4550f38b11abc7855ea79d340cb1bfd8e33614ae057db2a0a58cae8"
# How the shipped weights were trained: the whole training set, 3 epochs, seed 0, on the
# CPU with this many threads (a fixed count keeps the float reductions in one order).
SHIPPED = dict(seed=0, epochs=3, threads=2)


class ClassifierError(RuntimeError):
    """The shipped classifier weights are missing or are not the recorded ones."""


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
    """Train on uint8 images (N, 28, 28); deterministic from `seed` (on one device and
    thread count).

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


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----- the shipped weights -----
def load_classifier(device="cpu", path=WEIGHTS, sha256: str = WEIGHTS_SHA256
                    ) -> tuple[MNISTClassifier, dict]:
    """The shipped classifier, after checking the file's SHA-256. Returns (model, info);
    info has 'test_accuracy', 'seed', 'epochs', 'train_size', 'sha256' and 'path'.
    Raises ClassifierError (one line, saying how to restore or retrain) otherwise."""
    path = Path(path)
    fix = ("restore it with `git checkout -- utils/weights/`, or train new weights with "
           "`python -m utils.classifier --retrain` and record the hash it prints in "
           "utils/classifier.py (WEIGHTS_SHA256); FIDs then change")
    if not path.is_file():
        raise ClassifierError(f"evaluation classifier weights {path} are missing; {fix}")
    found = sha256_of(path)
    if found != sha256:
        raise ClassifierError(f"evaluation classifier weights {path} have SHA-256 {found[:16]}..., "
                              f"not the recorded {sha256[:16]}...; {fix}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MNISTClassifier()
    model.load_state_dict(state["model"])
    info = {k: state[k] for k in ("test_accuracy", "seed", "epochs", "train_size")}
    return model.to(device).eval(), {**info, "sha256": found, "path": str(path)}


def retrain(data_dir="./data", path=WEIGHTS, progress: bool = True, log=print,
            download: bool = True) -> dict:
    """Train the shipped classifier again (CPU, SHIPPED settings) and write it to `path`.

    Returns its info with the new file's 'sha256'; RuntimeError below MIN_ACCURACY.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(SHIPPED["threads"])
    try:
        images, labels = load_mnist(data_dir, train=True, download=download)
        start = time.time()
        model = train_classifier(images, labels, epochs=SHIPPED["epochs"], seed=SHIPPED["seed"],
                                 device="cpu", progress=progress)
        test_images, test_labels = load_mnist(data_dir, train=False, download=download)
        acc = accuracy(model, test_images, test_labels)
    finally:
        torch.set_num_threads(threads)
    log(f"evaluation classifier: test accuracy {100 * acc:.2f}% (trained in "
        f"{time.time() - start:.0f} s on the CPU, {SHIPPED['threads']} threads)")
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"the evaluation classifier reached only {100 * acc:.2f}% test "
                           f"accuracy (needs {100 * MIN_ACCURACY:.0f}%); not written")
    info = {"test_accuracy": acc, "seed": SHIPPED["seed"], "epochs": SHIPPED["epochs"],
            "train_size": len(images), "threads": SHIPPED["threads"], "torch": str(torch.__version__)}
    atomic_save({"format": FORMAT, "version": VERSION, "model": model.state_dict(), **info}, path)
    return {**info, "sha256": sha256_of(path), "path": str(path)}


# ----- quick classifiers for tests -----
def classifier_path(checkpoint_dir, seed: int = 0, train_size: int | None = None,
                    epochs: int = 3) -> Path:
    suffix = "" if train_size is None and epochs == 3 else f"_n{train_size}_e{epochs}"
    return Path(checkpoint_dir) / f"mnist_classifier_seed{seed}{suffix}.pt"


def load_or_train_classifier(data_dir="./data", checkpoint_dir="./checkpoints", device="cpu",
                             seed: int = 0, train_size: int | None = None, epochs: int = 3,
                             progress: bool = True, log=print, download: bool = True
                             ) -> tuple[MNISTClassifier, dict]:
    """A classifier trained on the first `train_size` digits (all if None), cached in
    `checkpoint_dir`: for tests that want one of their own. Not the shipped weights,
    so its FIDs are not comparable with published ones. Returns (model, info)."""
    path = classifier_path(checkpoint_dir, seed, train_size, epochs)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") == FORMAT and state.get("version") == VERSION:
                model = MNISTClassifier()
                model.load_state_dict(state["model"])
                info = {k: state[k] for k in ("test_accuracy", "seed", "train_size", "epochs")}
                return model.to(device).eval(), {**info, "path": str(path)}
        except Exception as error:  # a stale or broken cache is simply retrained
            log(f"ignoring unreadable classifier cache {path} ({type(error).__name__})")
    images, labels = load_mnist(data_dir, train=True, download=download)
    if train_size is not None:
        images, labels = images[:train_size], labels[:train_size]
    log(f"training a classifier on {len(images)} MNIST digits ({epochs} epochs, seed {seed}); "
        f"cached in {path}")
    model = train_classifier(images, labels, epochs=epochs, seed=seed, device=device,
                             progress=progress)
    test_images, test_labels = load_mnist(data_dir, train=False, download=download)
    info = {"test_accuracy": accuracy(model, test_images, test_labels), "seed": seed,
            "train_size": len(images), "epochs": epochs}
    atomic_save({"format": FORMAT, "version": VERSION, "model": model.state_dict(), **info}, path)
    return model.to(device).eval(), {**info, "path": str(path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.classifier",
        description="Check the shipped evaluation classifier, or train it again.")
    parser.add_argument("--retrain", action="store_true",
                        help="train the classifier again (CPU, ~3 minutes on 2 cores) and write "
                             "it to --weights; prints the SHA-256 to record in WEIGHTS_SHA256")
    parser.add_argument("--calibrate", action="store_true",
                        help="also print the FID of real, blurred and noise digits")
    parser.add_argument("--data-dir", default="./data", help="folder holding MNIST/raw/")
    parser.add_argument("--weights", default=str(WEIGHTS), help="the weights file")
    parser.add_argument("--no-download", dest="download", action="store_false")
    args = parser.parse_args(argv)
    if args.retrain:
        info = retrain(args.data_dir, args.weights, download=args.download)
        print(f"wrote {info['path']}\n  test accuracy {100 * info['test_accuracy']:.2f}%\n"
              f"  SHA-256 {info['sha256']}\n"
              f"record it in utils/classifier.py: WEIGHTS_SHA256 = \"{info['sha256']}\"")
        sha256 = info["sha256"]
    else:
        sha256 = WEIGHTS_SHA256
    try:
        model, info = load_classifier("cpu", args.weights, sha256)
    except ClassifierError as error:
        print(f"python -m utils.classifier: error: {error}", file=sys.stderr)
        return 1
    test_images, test_labels = load_mnist(args.data_dir, train=False, download=args.download)
    print(f"{info['path']}: SHA-256 {info['sha256']} (matches the recorded hash)\n"
          f"  test accuracy {100 * accuracy(model, test_images, test_labels):.2f}% "
          f"(recorded at training: {100 * info['test_accuracy']:.2f}%)")
    if args.calibrate:
        from utils.metrics import Evaluator, calibration

        evaluator = Evaluator(args.data_dir, device="cpu", progress=False, download=args.download,
                              classifier=(model, info))
        for count in (1000, 10000):
            for name, result in calibration(evaluator, count).items():
                print(f"  {count:>6} {name:<8} FID {result['fid']:9.3f}   "
                      f"{100 * result['confident_fraction']:5.1f}% with p > 0.9   class KL "
                      f"{result['class_kl']:.3f}   precision {result['precision']:.3f}   "
                      f"recall {result['recall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
