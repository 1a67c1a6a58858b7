"""Sample-quality metrics, measured in the space of the dataset's evaluation classifier.

- FID: Frechet distance between Gaussians fitted to the classifier's 128-d
  penultimate features of the samples and of the dataset's test split.
- coverage: histogram of predicted classes and its KL divergence from uniform.
- confidence: mean top-class probability, and the fraction above 0.9.
- conditional accuracy (samples drawn for given classes): the share the classifier
  assigns to the class asked for, overall and per class.
- precision / recall: k-NN manifold estimates in feature space (Kynkaanniemi et al. 2019).
- memorisation: mean pixel distance from each sample to its nearest training image,
  beside the same for real test images.

Every result comes with its floor: the same metrics for real training images (as
many as the samples) against the test set. FID depends on the sample count, so
compare only at equal counts. The classifier is shipped for MNIST and Fashion-MNIST
(its hash checked on load), so an FID means the same on every machine;
`calibration` gives the scale: real, blurred and noise images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from config import MIN_EVAL_SAMPLES as MIN_SAMPLES
from evaluation.classifier import floor_index, classifier_for, predict
from utils.data_loader import as_image_batch, to_uint8
from utils.datasets import Dataset
from utils.errors import UsageError

CONFIDENT = 0.9


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, in float64."""
    f = features.double().cpu().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2).

    The trace term equals tr((S1 S2)^1/2) and is computed from symmetric
    eigendecompositions, which stay stable when a covariance is singular.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def class_coverage(probs: torch.Tensor) -> dict:
    """Predicted-class histogram (fractions) and KL(histogram || uniform) in nats.

    KL is 0 for perfectly balanced classes and log(K) (2.30 for K = 10) for a single class.
    """
    num_classes = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=num_classes).double()
    hist = counts / counts.sum()
    nonzero = hist > 0
    kl = float((hist[nonzero] * torch.log(hist[nonzero] * num_classes)).sum())
    return {"class_histogram": [round(float(h), 4) for h in hist], "class_kl": kl,
            "min_class_fraction": float(hist.min()), "max_class_fraction": float(hist.max())}


def conditional_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """Share of samples whose predicted class is the one asked for, overall and per class
    (None for a class nobody asked for)."""
    labels = labels.long().cpu()
    hit = (probs.argmax(1).cpu() == labels).double()
    per_class = [float(hit[labels == k].mean()) if (labels == k).any() else None
                 for k in range(probs.shape[1])]
    return {"conditional_accuracy": float(hit.mean()), "per_class_accuracy": per_class}


def confidence(probs: torch.Tensor) -> dict:
    top = probs.max(1).values
    return {"mean_confidence": float(top.mean()),
            "confident_fraction": float((top > CONFIDENT).double().mean())}


def _pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048):
    """Yield (start, distances (chunk, len(b))) of Euclidean distances, chunked over a."""
    b_sq = (b * b).sum(1)
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        d2 = (x * x).sum(1, keepdim=True) - 2 * x @ b.T + b_sq[None]
        yield i, d2.clamp_(min=0).sqrt_()


def _kth_neighbour_radius(f: torch.Tensor, k: int) -> torch.Tensor:
    radii = torch.empty(len(f), dtype=f.dtype)
    for i, d in _pairwise(f, f):
        radii[i:i + len(d)] = d.kthvalue(k + 1, dim=1).values  # +1: the point itself
    return radii


def _coverage_of(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    inside = torch.zeros(len(points), dtype=torch.bool)
    for i, d in _pairwise(points, centres):
        inside[i:i + len(d)] = (d <= radii[None]).any(1)
    return float(inside.double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls."""
    real, fake = real.float(), fake.float()
    precision = _coverage_of(fake, real, _kth_neighbour_radius(real, k))
    recall = _coverage_of(real, fake, _kth_neighbour_radius(fake, k))
    return {"precision": precision, "recall": recall}


def nearest_neighbour_distance(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pixel-space L2 distance (uint8 images, as [0, 1]) from each image to its nearest
    reference."""
    a = images.reshape(len(images), -1).float() / 255.0
    b = reference.reshape(len(reference), -1).float() / 255.0
    out = torch.empty(len(a))
    for i, d in _pairwise(a, b, chunk=512):
        out[i:i + len(d)] = d.min(1).values
    return out


class Evaluator:
    """Scores sets of generated images against a dataset's test split.

    Takes the dataset's evaluation classifier (shipped, or trained once and cached; or
    `classifier`, a (model, info) pair, for tests) and computes the test-set feature
    statistics once; `evaluate(images)` takes uint8 (N, H, W) / (N, C, H, W) or float
    (N, C, H, W) in [-1, 1]. Class metrics need a classifier of the dataset's classes:
    a one-class folder's classifier tells rotations apart, and reports FID, precision,
    recall and memorisation only.
    """

    def __init__(self, dataset: Dataset, device="cpu", progress: bool = True, log=print,
                 classifier: tuple | None = None):
        self.dataset = dataset
        self.device = torch.device(device)
        self.progress = progress
        model, self.classifier_info = classifier or classifier_for(dataset, progress, log)
        self.classifier = model.to(self.device).eval()
        self.has_classes = self.classifier_info.get("task", "classes") == "classes"
        self.train_images, self.train_labels = dataset.load("train")
        self.test_images, self.test_labels = dataset.load("test")
        # the floor's real images: ones the classifier never saw (a folder's held-out share),
        # else (shipped classifiers, trained on every training image) the training split
        self.floor_index = floor_index(dataset)
        self.floor_source = ("held-out training images (not seen by the classifier)"
                             if self.floor_index is not None else "training images")
        self.test_features, _ = predict(self.classifier, self.test_images, progress=progress,
                                        desc="test-set features")
        self.test_mu, self.test_sigma = feature_statistics(self.test_features)
        self._floors: dict[tuple, dict] = {}
        self.memorisation_count = 2000

    def evaluate(self, images: torch.Tensor, floor: bool = True, memorisation: bool = True,
                 precision_recall_k: int | None = 3, labels: torch.Tensor | None = None) -> dict:
        """All metrics for `images`, plus the floor for the same count if `floor`.
        labels: the class each image was drawn for (a conditional model's), which adds
        the conditional accuracy; its floor is the classifier's on real images."""
        images = as_image_batch(images if images.dtype == torch.uint8 else to_uint8(images.cpu()))
        if images.shape[1:] != self.dataset.image_shape:
            raise UsageError(f"images of shape {tuple(images.shape[1:])} cannot be scored against "
                             f"{self.dataset.title}, whose images are {self.dataset.image_shape}")
        if len(images) < MIN_SAMPLES:
            raise UsageError(f"evaluation needs at least {MIN_SAMPLES} images, got {len(images)} "
                             f"(FID depends on the count: 10,000 is the standard)")
        features, probs = predict(self.classifier, images, progress=self.progress,
                                  desc="sample features")
        if not torch.isfinite(features).all():
            raise UsageError("the images' classifier features are not finite")
        mu, sigma = feature_statistics(features)
        result = {"num_samples": len(images),
                  "fid": frechet_distance(mu, sigma, self.test_mu, self.test_sigma)}
        if self.has_classes:
            result.update(**confidence(probs), **class_coverage(probs))
        if labels is not None and self.has_classes:
            if len(labels) != len(images):
                raise ValueError(f"{len(labels)} labels for {len(images)} images")
            result.update(conditional_accuracy(probs, labels))
        real = self.test_features[:len(images)]
        if precision_recall_k and min(len(real), len(features)) > precision_recall_k:
            result.update(precision_recall(real, features, precision_recall_k))
        if memorisation:
            n = min(len(images), self.memorisation_count)
            result["nn_train_distance"] = float(
                nearest_neighbour_distance(images[:n], self.train_images).mean())
            result["nn_train_distance_count"] = n
        if floor:
            result["floor"] = self.floor(len(images), memorisation, precision_recall_k,
                                         labels is not None)
        return result

    @property
    def floor_size(self) -> int:
        """How many real images a floor can use: FID falls with the count, so samples are
        best scored at most this many at a time."""
        return len(self.floor_index) if self.floor_index is not None else len(self.train_images)

    def floor(self, count: int, memorisation: bool = True, precision_recall_k: int | None = 3,
              labels: bool = False) -> dict:
        """The metrics of `count` real images (a fixed random subset of floor_size; fewer if
        there are fewer) vs the test set; for memorisation, the distance of real *test*
        images to the training set; with labels, the classifier's accuracy on those
        images' true labels."""
        key = (count, memorisation, precision_recall_k, labels)
        if key not in self._floors:
            generator = torch.Generator().manual_seed(1234)
            pool = (self.floor_index if self.floor_index is not None
                    else torch.arange(len(self.train_images)))
            index = pool[torch.randperm(len(pool), generator=generator)[:count]]
            real = self.train_images[index]
            if len(real) < MIN_SAMPLES:  # too few to score: the count alone, said so
                self._floors[key] = {"num_samples": len(real), "source": self.floor_source +
                                     f", too few to score (at least {MIN_SAMPLES})"}
                return self._floors[key]
            floor = self.evaluate(real, floor=False, memorisation=False,
                                  precision_recall_k=precision_recall_k,
                                  labels=self.train_labels[index] if labels else None)
            floor["source"] = self.floor_source
            if memorisation:
                n = min(count, self.memorisation_count)
                floor["nn_train_distance"] = float(
                    nearest_neighbour_distance(self.test_images[:n], self.train_images).mean())
                floor["nn_train_distance_count"] = n
            self._floors[key] = floor
        return self._floors[key]


def blur(images: torch.Tensor, size: int = 5) -> torch.Tensor:
    """uint8 (N, C, H, W) images smoothed by a size x size box filter, as uint8."""
    x = as_image_batch(images).float()
    channels = x.shape[1]
    kernel = torch.ones(channels, 1, size, size) / size ** 2
    return F.conv2d(x, kernel, padding=size // 2, groups=channels).round().clamp(0, 255).to(
        torch.uint8)


def calibration(evaluator: Evaluator, count: int = 10_000, precision_recall_k: int | None = 3
                ) -> dict:
    """The metrics of three reference sets of `count` images against the test set, the
    scale an FID is read on: 'real' (training images: the floor, as good as a model can
    be), 'blurred' (the same images, 5x5 box blur) and 'noise' (uniform pixel noise)."""
    real = evaluator.train_images[-count:]
    noise = torch.randint(0, 256, (count, *evaluator.dataset.image_shape), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    return {name: evaluator.evaluate(images, floor=False, memorisation=False,
                                     precision_recall_k=precision_recall_k)
            for name, images in [("real", real), ("blurred", blur(real)), ("noise", noise)]}


def format_report(result: dict, title: str = "") -> str:
    """A readable multi-line summary of `Evaluator.evaluate` output, floor beside each."""
    floor = result.get("floor", {})

    def row(name, key, fmt, note=""):
        value = result.get(key)
        if value is None:
            return None
        base = floor.get(key)
        text = f"  {name:<28}{format(value, fmt):>10}"
        if base is not None:
            text += f"   (real images: {format(base, fmt)})"
        return text + note

    lines = [title] if title else []
    lines.append(f"  samples{'':<21}{result['num_samples']:>10}")
    if floor:
        fewer = floor["num_samples"] < result["num_samples"]
        lines.append(f"  real images{'':<17}{floor['num_samples']:>10}   "
                     f"({floor.get('source', 'training images')}"
                     + ("; fewer than the samples: FID falls with the count, so compare at "
                        "equal counts" if fewer else "") + ")")
    lines += filter(None, [
        row("FID (classifier features)", "fid", ".3f"),
        row("classified with p > 0.9", "confident_fraction", ".1%"),
        row("mean confidence", "mean_confidence", ".3f"),
        row("class KL from uniform", "class_kl", ".4f"),
        row("the class asked for", "conditional_accuracy", ".2%",
            f"  (guidance {result['guidance']:g})" if "guidance" in result else ""),
        row("precision (k=3)", "precision", ".3f"),
        row("recall (k=3)", "recall", ".3f"),
        row("nearest-train distance", "nn_train_distance", ".3f",
            "  (real = test images; much lower = copying)"),
    ])
    hist = result.get("class_histogram")
    if hist:
        lines.append(f"  {'classes 0-' + str(len(hist) - 1) + ' (%)':<24}"
                     + "".join(f"{100 * h:6.1f}" for h in hist))
    per_class = result.get("per_class_accuracy")
    if per_class:
        lines.append(f"  {'right class, 0-' + str(len(per_class) - 1) + ' (%)':<24}" + "".join(
            "     -" if a is None else f"{100 * a:6.1f}" for a in per_class))
    return "\n".join(lines)
