"""`python -m scripts.export_pretrained runs/NAME/latest.pt`: the model that ships with the repo.

Writes the checkpoint's EMA weights and config (no optimizer: a few hundred KB) to
models/weights/mnist_cpu_pretrained.pt and prints the SHA-256 to record in
sampling/pretrained.py (SHA256), which `load_model("pretrained")` checks on every load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python scripts/NAME.py): the repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampling import pretrained
from utils.errors import report_errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.export_pretrained",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint written by main.py")
    parser.add_argument("--out", default=str(pretrained.WEIGHTS), help="where to write it")
    args = parser.parse_args(argv)

    def run():
        sha = pretrained.export(args.checkpoint, args.out)
        print(f"wrote {args.out}\n  SHA-256 {sha}\nrecord it in sampling/pretrained.py: "
              f"SHA256 = \"{sha}\"")
    return report_errors("python -m scripts.export_pretrained", run)


if __name__ == "__main__":
    sys.exit(main())
