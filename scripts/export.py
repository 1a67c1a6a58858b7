"""`python -m scripts.export --checkpoint CK --out DIR`: a model in the Hugging Face layout.

Writes DIR/config.json (the model's Config), DIR/model.safetensors (its EMA weights; no
pickle) and DIR/README.md (the model card: data, steps, training time and machine, FID with
its floor and evaluator, the command that trains it again, licences), see sampling/export.py.
`python generate.py --checkpoint DIR` and `load_model(DIR)` load the folder alone, offline;
`hf upload USER/NAME DIR` shares it on the Hub.

    python -m scripts.export --checkpoint runs/NAME/latest.pt --out hub/mnist-cpu
    python -m scripts.export --checkpoint pretrained --out hub/mnist-pretrained
    python -m scripts.export --checkpoint CK --out DIR --eval outputs/eval_latest_....json
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python scripts/NAME.py): the repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import OneLineArgumentParser
from sampling.export import export
from utils.errors import report_errors

PROG = "python -m scripts.export"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by main.py, or 'pretrained' (the model that "
                             "ships with the repo)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write (files of an earlier export are replaced)")
    parser.add_argument("--eval", nargs="+", default=[], metavar="JSON",
                        help="results of python generate.py --checkpoint CK --evaluate, for the "
                             "model card (for pretrained: its recorded score)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def run():
        for path in export(args.checkpoint, args.out, args.eval):
            print(f"wrote {path}")
        print(f"load it with: python generate.py --checkpoint {args.out}\n"
              f"share it with: hf upload USER/NAME {args.out}")
    return report_errors(PROG, run)


if __name__ == "__main__":
    sys.exit(main())
