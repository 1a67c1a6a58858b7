"""`python -m scripts.tune_steps`: search the timesteps of a few-step sampler for the lowest
FID, in the spirit of Align Your Steps (Sabour et al. 2024, who optimise a bound on the
sampling error; here the project's evaluator's FID itself is the objective).

    python -m scripts.tune_steps --checkpoint runs/NAME/latest.pt --steps 4
    python -m scripts.tune_steps --checkpoint pretrained --steps 4 --sampler dpm-solver-3m --eta 0
    python generate.py --checkpoint outputs/NAME_tuned4.pt --evaluate   # the result, on 10,000

Coordinate descent over the timesteps (`search`): the first stays T-1 (pure noise); each
other in turn moves to the best of --candidates points between its neighbours, evenly
spaced in log-SNR (the scale of DPM-Solver's steps), and a move is kept only where it
lowers the FID of --samples images; sweeps repeat until none moves, or --sweeps times. Every
schedule draws the same images (seed, classes 0-9 in turn), so two scores differ by the
timesteps alone. It starts from the sampler's own spacing (logsnr for dpm-solver, trailing
for a consistency student). The FID of 1,000 samples is higher than, and not comparable
with, that of 10,000: the search only ranks schedules.

Writes to --output-dir (default outputs/): tune_steps_<checkpoint>_<sampler>-<K>.json (the
search, every score) and <checkpoint>_tuned<K>.pt, a copy of the checkpoint's weights whose
config samples with the found timesteps (--spacing tuned, its TUNED_TIMESTEPS): generate.py
and `load_model` use them with no flag.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python scripts/NAME.py): the repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from config import ConfigError, check_device
from models import samplers
from sampling import pretrained
from sampling.api import dataset_of, load_model, settings_for
from sampling.settings import choose_classes, labels_for
from utils import checkpoint as ckpt
from utils.errors import report_errors
from utils.files import save_json


def candidates(log_snr: torch.Tensor, high: int, low: int, count: int) -> list[int]:
    """Up to `count` timesteps strictly between `high` and `low` (low = -1, the clean data:
    down to 0 included), evenly spaced in log-SNR (`log_snr` decreasing in t)."""
    inside = torch.arange(low + 1, high)
    if not len(inside):
        return []
    top, bottom = log_snr[high].item(), log_snr[max(low, 0)].item()
    parts = count + 1 if low >= 0 else count  # towards the clean data, t = 0 is a candidate
    targets = [top + (bottom - top) * j / parts for j in range(1, count + 1)]
    found = {int(inside[(log_snr[inside] - target).abs().argmin()]) for target in targets}
    return sorted(found, reverse=True)


def search(score, start: list[int], log_snr: torch.Tensor, sweeps: int = 2, count: int = 4,
           log=print) -> tuple[list[int], float, list[dict]]:
    """Coordinate descent on the timesteps `start` (decreasing, start[0] kept): returns
    (best timesteps, their score, every (timesteps, score) tried). `score(tuple)` is
    called once per schedule."""
    seen: dict[tuple, float] = {}

    def cost(timesteps: list[int]) -> float:
        key = tuple(timesteps)
        if key not in seen:
            seen[key] = score(key)
            log(f"  {' '.join(map(str, key))}: {seen[key]:.2f}")
        return seen[key]

    best = list(start)
    best_score = cost(best)
    for sweep in range(sweeps):
        moved = False
        for i in range(1, len(best)):
            low = best[i + 1] if i + 1 < len(best) else -1
            for t in candidates(log_snr, best[i - 1], low, count):
                trial = best[:i] + [t] + best[i + 1:]
                if cost(trial) < best_score:
                    best, best_score, moved = trial, cost(trial), True
        log(f"sweep {sweep + 1}: {' '.join(map(str, best))}, FID {best_score:.2f}")
        if not moved:
            break
    return best, best_score, [{"timesteps": list(k), "fid": v} for k, v in seen.items()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tune_steps",
        description="Search a few-step sampler's timesteps for the lowest FID (writes a JSON "
                    "and a checkpoint copy that samples with them).")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint written by main.py, or 'pretrained'")
    parser.add_argument("--steps", type=int, required=True, metavar="K",
                        help="network evaluations per image: the timesteps to find")
    parser.add_argument("--samples", type=int, default=1000, metavar="N",
                        help="images scored per schedule (default: 1000)")
    parser.add_argument("--sampler", choices=[s for s in samplers.SAMPLERS if s != "ddpm"],
                        help="(default: the checkpoint's)")
    parser.add_argument("--eta", type=float, help="sampler noise (default: the checkpoint's)")
    parser.add_argument("--sweeps", type=int, default=2, help="passes over the timesteps "
                                                              "(default: 2)")
    parser.add_argument("--candidates", type=int, default=4,
                        help="points tried between each timestep's neighbours (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="the images' noise (default: 0)")
    parser.add_argument("--batch-size", type=int, default=500, metavar="N")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--data-dir", default="", help="where the checkpoint's dataset is "
                                                       "(default: the checkpoint's)")
    parser.add_argument("--output-dir", default="outputs", help="(default: outputs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(args) -> int:
    from evaluation.metrics import Evaluator

    for flag in ("steps", "samples", "sweeps", "candidates", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got "
                              f"{getattr(args, flag)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    model = load_model(args.checkpoint, device)
    config = model.config
    settings = settings_for(model, args.sampler, args.steps, args.eta)
    if settings.sampler == "ddpm":
        raise ConfigError("the checkpoint samples with ddpm, which takes every timestep: "
                          "choose a --sampler (ddim, dpm-solver, dpm-solver-3m, consistency)")
    spacing = settings.spacing
    if spacing in ("auto", "tuned"):
        spacing = samplers.DEFAULT_SPACING[settings.sampler]
    start = samplers.timestep_sequence(config.TIMESTEPS, args.steps, spacing, model.scheduler)
    classes = choose_classes(config)
    labels = labels_for(classes, args.samples)
    evaluator = Evaluator(dataset_of(config, args.data_dir or None), device=device,
                          progress=False)

    def fid(timesteps: tuple) -> float:
        kwargs = settings_for(model, settings.sampler, args.steps, settings.eta,
                              timesteps).sample_kwargs()
        images = model.generate(args.samples, batch_size=args.batch_size, progress=False,
                                labels=None if labels is None else labels.to(device),
                                seed=args.seed, **kwargs)
        return evaluator.evaluate(images.cpu(), floor=False, memorisation=False,
                                  precision_recall_k=None, labels=labels)["fid"]

    label = f"{settings.sampler}-{args.steps}" + (f"-eta{settings.eta:g}" if settings.eta else "")
    print(f"searching {args.steps} timesteps of {label} for {args.checkpoint} on the FID of "
          f"{args.samples:,} samples, from {spacing} spacing")
    began = time.time()
    log_snr = torch.log(model.scheduler.snr.double().cpu())
    best, best_fid, tried = search(fid, start, log_snr, args.sweeps, args.candidates)
    name = Path(str(pretrained.resolve(args.checkpoint))).stem
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy = out / f"{name}_tuned{args.steps}.pt"
    state = ckpt.load_checkpoint(pretrained.resolve(args.checkpoint))
    tuned = {**state["config"], "SAMPLER": settings.sampler, "ETA": settings.eta,
             "SAMPLING_STEPS": args.steps, "SPACING": "tuned", "TUNED_TIMESTEPS": tuple(best)}
    ckpt.save_checkpoint({"config": tuned, **{k: state[k] for k in ("ema", "model", "guide",
                                                                    "step", "epoch")
                                              if k in state}}, copy)
    report = save_json({"checkpoint": str(args.checkpoint), "sampler": settings.sampler,
                        "eta": settings.eta, "steps": args.steps, "samples": args.samples,
                        "seed": args.seed, "start": {"timesteps": start, "fid": tried[0]["fid"]},
                        "best": {"timesteps": best, "fid": best_fid}, "tried": tried,
                        "seconds": time.time() - began, "checkpoint_copy": str(copy)},
                       out / f"tune_steps_{name}_{label}.json")
    print(f"found {' '.join(map(str, best))}: FID {best_fid:.2f} against {tried[0]['fid']:.2f} "
          f"({spacing}: {' '.join(map(str, start))}), {len(tried)} schedules scored\n"
          f"wrote {report}\nwrote {copy}\n"
          f"next: python generate.py --checkpoint {copy} --evaluate")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors("tune_steps", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
