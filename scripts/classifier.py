"""`python -m scripts.classifier`: check a dataset's evaluation classifier, or train it again.

    python -m scripts.classifier                                # MNIST's: hash, test accuracy
    python -m scripts.classifier --calibrate                    # and the FID of real, blurred, noise
    python -m scripts.classifier --dataset fashion-mnist --retrain   # prints the hash to record
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python scripts/NAME.py): the repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.classifier import (SHIPPED, WEIGHTS_DIR, accuracy, classifier_for, load_shipped,
                                   retrain)
from evaluation.metrics import Evaluator, calibration
from utils.datasets import NAMES, open_dataset
from utils.errors import report_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.classifier",
        description="Check a dataset's evaluation classifier, or train it again.")
    parser.add_argument("--dataset", choices=NAMES, default="mnist")
    parser.add_argument("--data-dir", default="", help="where the dataset is (default: the "
                                                       "repo's data/ folder)")
    parser.add_argument("--retrain", action="store_true",
                        help="train the classifier again (CPU, a few minutes on 2 cores) and write "
                             "it to --weights; prints the SHA-256 to record in SHIPPED")
    parser.add_argument("--calibrate", action="store_true",
                        help="also print the FID of real, blurred and noise images (1,000 and "
                             "10,000 of each; about a minute)")
    parser.add_argument("--weights", help=f"the weights file (default: {WEIGHTS_DIR}/...)")
    parser.add_argument("--no-download", dest="download", action="store_false")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args) -> int:
    dataset = open_dataset(args.dataset, args.data_dir or None, args.download)
    progress = not args.quiet
    if args.retrain:
        info = retrain(dataset, args.weights, progress=progress)
        print(f"wrote {info['path']}\n  test accuracy {100 * info['test_accuracy']:.2f}%\n"
              f"  SHA-256 {info['sha256']}\n"
              f"record it in evaluation/classifier.py: SHIPPED[{dataset.name!r}]")
        model, info = load_shipped(dataset.name, "cpu", info["path"], info["sha256"])
    elif dataset.name in SHIPPED:
        model, info = load_shipped(dataset.name, "cpu", args.weights)
        print(f"{info['path']}: SHA-256 {info['sha256']} (matches the recorded hash)")
    else:
        model, info = classifier_for(dataset, progress)
    test_images, test_labels = dataset.load("test")
    print(f"  test accuracy {100 * accuracy(model, test_images, test_labels):.2f}% "
          f"(recorded at training: {100 * info['test_accuracy']:.2f}%)")
    if args.calibrate:
        evaluator = Evaluator(dataset, device="cpu", progress=progress, classifier=(model, info))
        for count in (1000, 10000):
            print(f"  calibrating on {count:,} images of each kind ...", flush=True)
            for name, result in calibration(evaluator, count).items():
                print(f"  {count:>6} {name:<8} FID {result['fid']:9.3f}   "
                      f"{100 * result['confident_fraction']:5.1f}% with p > 0.9   class KL "
                      f"{result['class_kl']:.3f}   precision {result['precision']:.3f}   "
                      f"recall {result['recall']:.3f}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors("python -m scripts.classifier", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
