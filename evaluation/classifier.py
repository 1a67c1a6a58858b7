"""The evaluation classifier: a small LeNet-style CNN per dataset, whose features define FID.

Inception-v3 FID needs weights from the internet and was never meant for 28x28 grey
images. Instead each dataset has a small CNN trained once on its own training split
(deterministic: CPU, seed 0, 2 threads): its 128-d penultimate layer is the feature
space of the FID in evaluation/metrics.py, its softmax gives the confident share, the
class balance and the conditional accuracy.

- MNIST and Fashion-MNIST: shipped in evaluation/weights/, their SHA-256 recorded in
  SHIPPED and checked on every load, so that an FID means the same on every machine.
  `python -m scripts.classifier --dataset NAME --retrain` trains them again.
- any other dataset (a folder of your images): trained on first use and cached under
  checkpoints/evaluators/, keyed by the data's content fingerprint, so that changed data
  gets a new classifier. A folder of one class has no classes to tell apart: its
  classifier learns to tell the four rotations of its images apart instead (Gidaris et
  al. 2018), whose features serve the FID; class metrics are then not reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.checkpoint import atomic_save
from utils.data_loader import normalize_images
from utils.datasets import Dataset
from utils.datasets.base import ROOT
from utils.errors import DataError
from utils.files import check_recorded, sha256_of

FORMAT = "mnist-classifier"
VERSION = 1
FEATURE_DIM = 128
SIDE = 28  # the classifier sees 28x28 images; other sizes are resized to it
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CACHE_DIR = ROOT / "checkpoints" / "evaluators"  # classifiers trained on first use
# How shipped weights are trained: the whole training set, 3 epochs, seed 0, on the CPU
# with this many threads (a fixed count keeps the float reductions in one order).
RECIPE = dict(seed=0, epochs=3, threads=2)
# A classifier trained here (a folder's) leaves this share of the training split out: the
# "real images" floor of an evaluation is scored on them, images it has never seen.
FLOOR_SHARE = 0.2


@dataclass(frozen=True)
class Shipped:
    file: str
    sha256: str
    min_accuracy: float  # retraining below this is refused


# The shipped weights and their SHA-256 (printed by `python -m scripts.classifier --retrain`).
SHIPPED = {
    "mnist": Shipped("mnist_classifier.pt",
                     "7e789769d4550f38b11abc7855ea79d340cb1bfd8e33614ae057db2a0a58cae8", 0.99),
    # 89.62% on the test split (3 epochs, seed 0, 2 threads; 909 s on a busy 2-core CPU)
    "fashion-mnist": Shipped("fashion_mnist_classifier.pt",
                             "7d0c4d2c38219ba2d191afb1d78b5cf7888d2c4dfcc867676177c9b07c7aa1cb",
                             0.88),
}


class ClassifierError(DataError):
    """The shipped classifier weights are missing or are not the recorded ones."""


class Classifier(nn.Module):
    """conv5x5(32) - pool - conv5x5(64) - pool - fc(128) - fc(classes), with batch norm.

    Input: (B, C, H, W) in [-1, 1] (resized to 28x28 if H or W differ). forward ->
    logits (B, classes); features -> (B, 128).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (SIDE, SIDE):
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


MNISTClassifier = Classifier  # the name of earlier versions


def rotations(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image in its four rotations, labelled 0-3 (the one-class folder's task)."""
    turned = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    labels = torch.arange(4).repeat_interleave(len(images))
    return torch.cat(turned), labels


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, device="cpu",
                     progress: bool = True, num_classes: int | None = None) -> Classifier:
    """Train on uint8 images (N, C, H, W) (or (N, H, W)); deterministic from `seed` (on one
    device and thread count). Small random shifts (up to 2 pixels) make it robust to
    off-centre images. The global random state is left as it was."""
    device = torch.device(device)
    images = images.unsqueeze(1) if images.dim() == 3 else images
    num_classes = num_classes or int(labels.max()) + 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = Classifier(images.shape[1], num_classes).to(device)
        generator = torch.Generator().manual_seed(seed)
        x_all = normalize_images(images).to(device)
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
def predict(model: Classifier, images: torch.Tensor, batch_size: int = 1000,
            progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 128), class probabilities (N, classes)) in float64 on the CPU.

    images: uint8 (N, H, W) / (N, C, H, W), or float (N, C, H, W) in [-1, 1].
    """
    device = next(model.parameters()).device
    model.eval()
    features, probs = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        x = images[i:i + batch_size]
        if x.dtype == torch.uint8:
            x = normalize_images(x.unsqueeze(1) if x.dim() == 3 else x)
        f = model.features(x.float().to(device))
        features.append(f.double().cpu())
        probs.append(F.softmax(model.head(f), dim=1).double().cpu())
    return torch.cat(features), torch.cat(probs)


def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, probs = predict(model, images)
    return (probs.argmax(1) == labels.cpu()).double().mean().item()


def _from_state(state: dict, channels: int) -> Classifier:
    model = Classifier(channels, state["model"]["head.weight"].shape[0])
    model.load_state_dict(state["model"])
    return model


# ----- the shipped weights -----
def load_shipped(dataset_name: str = "mnist", device="cpu", path=None,
                 sha256: str | None = None) -> tuple[Classifier, dict]:
    """The shipped classifier of a dataset, after checking the file's SHA-256. Returns
    (model, info); info has 'test_accuracy', 'seed', 'epochs', 'train_size', 'sha256' and
    'path'. Raises ClassifierError (one line, saying how to restore or retrain) otherwise."""
    shipped = SHIPPED.get(dataset_name)
    path = Path(path or WEIGHTS_DIR / shipped.file)
    sha256 = sha256 or shipped.sha256
    fix = (f"restore it with `git checkout -- evaluation/weights/`, or train new weights with "
           f"`python -m scripts.classifier --dataset {dataset_name} --retrain` and record the "
           f"hash it prints in evaluation/classifier.py (SHIPPED); FIDs then change")
    found = check_recorded(path, sha256, "evaluation classifier weights", fix, ClassifierError)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = _from_state(state, state["model"]["body.0.weight"].shape[1])
    info = {k: state[k] for k in ("test_accuracy", "seed", "epochs", "train_size")}
    return model.to(device).eval(), {**info, "sha256": found, "path": str(path),
                                     "dataset": dataset_name}


def load_classifier(device="cpu", path=None, sha256: str | None = None):
    """The shipped MNIST classifier (see load_shipped)."""
    return load_shipped("mnist", device, path, sha256)


def floor_index(dataset: Dataset) -> torch.Tensor | None:
    """The training images a classifier trained here never sees (FLOOR_SHARE of them, a
    fixed random choice): the real images of an evaluation's floor. None for a dataset
    with shipped weights, trained on its whole training split."""
    if dataset.name in SHIPPED:
        return None
    count = len(dataset.load("train")[0])
    order = torch.randperm(count, generator=torch.Generator().manual_seed(RECIPE["seed"]))
    return order[:max(1, round(FLOOR_SHARE * count))].sort().values


def train_for(dataset: Dataset, progress: bool = True, log=print, train_size: int | None = None,
              epochs: int = RECIPE["epochs"], seed: int = RECIPE["seed"]) -> tuple[Classifier, dict]:
    """Train a dataset's classifier by the shipped recipe (CPU, RECIPE's threads, or fewer
    where the process is limited to fewer): its classes, or for one class the four
    rotations. Returns (model, info)."""
    images, labels = dataset.load("train")
    held = floor_index(dataset)
    if held is not None:
        kept = torch.ones(len(images), dtype=torch.bool)
        kept[held] = False
        images, labels = images[kept], labels[kept]
    if train_size is not None:
        images, labels = images[:train_size], labels[:train_size]
    task = "classes" if dataset.num_classes >= 2 else "rotations"
    if task == "rotations":
        images, labels = rotations(images)
    threads = torch.get_num_threads()  # the run's own (--threads, OMP_NUM_THREADS): never more
    used = min(RECIPE["threads"], threads)
    torch.set_num_threads(used)
    start = time.time()
    try:
        model = train_classifier(images, labels, epochs=epochs, seed=seed, device="cpu",
                                 progress=progress, num_classes=max(dataset.num_classes, 2)
                                 if task == "classes" else 4)
        test_images, test_labels = dataset.load("test")
        if task == "rotations":
            test_images, test_labels = rotations(test_images)
        acc = accuracy(model, test_images, test_labels)
    finally:
        torch.set_num_threads(threads)
    log(f"evaluation classifier for {dataset.title}: test accuracy {100 * acc:.2f}% on its "
        f"{task} (trained in {time.time() - start:.0f} s on the CPU, {used} thread(s))")
    info = {"test_accuracy": acc, "seed": seed, "epochs": epochs, "train_size": len(images),
            "threads": used, "torch": str(torch.__version__), "task": task,
            "dataset": dataset.name, "fingerprint": dataset.fingerprint}
    return model, info


def save_classifier(model: Classifier, info: dict, path) -> dict:
    atomic_save({"format": FORMAT, "version": VERSION, "model": model.state_dict(), **info}, path)
    return {**info, "sha256": sha256_of(path), "path": str(path)}


def retrain(dataset: Dataset, path=None, progress: bool = True, log=print) -> dict:
    """Train a shipped classifier again and write it (default: its shipped file). Returns
    its info with the new file's 'sha256'; RuntimeError below the dataset's minimum."""
    shipped = SHIPPED.get(dataset.name)
    path = Path(path or WEIGHTS_DIR / (shipped.file if shipped else
                                       f"{dataset.name.replace('-', '_')}_classifier.pt"))
    model, info = train_for(dataset, progress, log)
    minimum = shipped.min_accuracy if shipped else 0.0
    if info["test_accuracy"] < minimum:
        raise RuntimeError(f"the evaluation classifier reached only "
                           f"{100 * info['test_accuracy']:.2f}% test accuracy (needs "
                           f"{100 * minimum:.0f}%); not written")
    return save_classifier(model, info, path)


def cached_path(dataset: Dataset, cache_dir=None, train_size: int | None = None,
                epochs: int = RECIPE["epochs"]) -> Path:
    cache_dir = cache_dir or CACHE_DIR
    suffix = "" if train_size is None and epochs == RECIPE["epochs"] else f"_n{train_size}_e{epochs}"
    held = f"-floor{round(100 * FLOOR_SHARE)}"  # (earlier caches trained on every image)
    return Path(cache_dir) / f"{dataset.name}-{dataset.fingerprint[:16]}{held}{suffix}.pt"


def load_or_train(dataset: Dataset, cache_dir=None, progress: bool = True, log=print,
                  train_size: int | None = None, epochs: int = RECIPE["epochs"]
                  ) -> tuple[Classifier, dict]:
    """A classifier for `dataset` trained on first use and cached, keyed by the content's
    fingerprint (a stale or broken cache is trained again)."""
    path = cached_path(dataset, cache_dir, train_size, epochs)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if (state.get("format") == FORMAT and state.get("version") == VERSION
                    and state.get("fingerprint") == dataset.fingerprint):
                info = {k: state[k] for k in ("test_accuracy", "seed", "train_size", "epochs",
                                              "task")}
                return _from_state(state, dataset.channels).eval(), {**info, "path": str(path),
                                                                     "cached": True}
        except Exception as error:  # a stale or broken cache is simply trained again
            log(f"ignoring unreadable classifier cache {path} ({type(error).__name__})")
    log(f"training an evaluation classifier for {dataset.title} on its training split "
        f"(once; cached in {path})")
    model, info = train_for(dataset, progress, log, train_size, epochs)
    return model, {**save_classifier(model, info, path), "cached": False}


def classifier_for(dataset: Dataset, progress: bool = True, log=print) -> tuple[Classifier, dict]:
    """The evaluator's classifier: the shipped one where there is one, else cached."""
    if dataset.name in SHIPPED:
        return load_shipped(dataset.name)
    return load_or_train(dataset, progress=progress, log=log)
