"""`python -m scripts.speed`: the ways to run sampling on this CPU, timed side by side.

Draws digits end to end (`model.generate` with the checkpoint's sampling settings, classes
0-9 in turn: the CPU preset's SDE-DPM-Solver++, 20 network evaluations per image) with
the UNet run each of these ways:

  eager           the default path: fp32 under torch.no_grad, the allocator tuned
  default-malloc  the same with glibc's default malloc thresholds, in a subprocess
                  (MNIST_DIFFUSION_DEFAULT_MALLOC=1; utils/allocator.py)
  inference-mode  generate under torch.inference_mode() instead of no_grad
  channels-last   the UNet in channels_last memory format, inputs converted
  compile         torch.compile(model.unet) (needs a C++ compiler; the first call at each
                  batch compiles, so the warm-up time is reported apart)
  onnxruntime     the UNet exported to ONNX and run by onnxruntime (sampling/fast.py)
  openvino        the same ONNX file compiled by OpenVINO for the CPU

Each variant is first checked: its first --check images must match eager's within
--tolerance (and its UNet output on one batch within 1e-4). Then, per batch size: one
warm-up call at that batch, and --repeats timed draws of --count images; the best and
median images/s are reported with the user and system CPU seconds of the timed part
(and the CPU milliseconds per image, which other processes on the machine sway less).
A variant that fails is recorded with its error's last line; one whose package is
missing (onnxruntime, openvino: `pip install onnxruntime openvino onnxscript`, not in
requirements.txt) as "not installed". Results go to --out (JSON, rewritten after each
measurement) and a Markdown table at the end.

    python -m scripts.speed                          # all variants, batches 100 and 500
    python -m scripts.speed --allocator              # eager against glibc's defaults
    python -m scripts.speed --variants eager,onnxruntime --batches 500 --count 1000
    python -m scripts.speed --dry-run                # every variant, tiny, in seconds

Without --checkpoint the model is a fresh CPU-preset model with random weights (the
speed does not depend on them; layers that start at zero are drawn at random too, so
that the correctness check compares a network whose output depends on its input).
A benchmark, not a test: numbers depend on what else the machine is doing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file (python scripts/NAME.py): the repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Config
from models.diffusion import DiffusionModel
from sampling import fast
from sampling.api import settings_for
from sampling.settings import choose_classes, labels_for
from utils import allocator
from utils.errors import UsageError, report_errors
from utils.files import save_json
from utils.machine import cpu_name

PROG = "python -m scripts.speed"
VARIANTS = ("eager", "default-malloc", "inference-mode", "channels-last", "compile",
            "onnxruntime", "openvino")
UNET_TOLERANCE = 1e-4  # max |difference| of one UNet call from eager's
DRY = dict(count=8, batches="4", repeats=1, steps=3, timesteps=50)  # --dry-run's sizes
QUOTED = 10_000  # the table's "seconds for 10,000 digits"
ROOT = Path(__file__).resolve().parents[1]
ADVICE = ("Set TORCHDYNAMO_VERBOSE", "For even more developer context", "You can suppress")


class Measurement:
    """What every variant shares: the arguments, the model, its sampling settings and
    classes, the eager reference images, and the report written after each row."""

    def __init__(self, args, model: DiffusionModel, work: Path):
        self.args, self.model, self.work = args, model, work
        steps = DRY["steps"] if args.dry_run else None
        self.settings = settings_for(model, steps=steps)
        self.classes = choose_classes(model.config)
        self.reference = None  # eager's first --check images
        self.exporter = None  # which ONNX exporter worked, once the UNet is exported
        self.unet_inputs = fast.example_inputs(model, max(2, args.check))
        with torch.no_grad():
            self.unet_reference = model.unet(*self.unet_inputs)
        self.report = {"machine": machine(args.threads), "settings": self.describe(),
                       "results": []}

    def describe(self) -> dict:
        a, s = self.args, self.settings
        return {"command": " ".join([PROG, *sys.argv[1:]]), "model": describe_model(self.model),
                "checkpoint": a.checkpoint, "sampler": s.label, "guidance": s.guidance,
                "network_evaluations_per_image": s.network_evaluations(self.model.conditional),
                "classes": self.classes, "count": a.count, "batches": a.batch_list,
                "repeats": a.repeats, "threads": a.threads, "check_images": a.check,
                "tolerance": a.tolerance, "unet_tolerance": UNET_TOLERANCE,
                "dry_run": a.dry_run}

    def labels(self, count: int):
        return labels_for(self.classes, count)

    def draw(self, model, count: int, batch: int, context=contextlib.nullcontext):
        with context():
            return model.generate(count, batch_size=batch, labels=self.labels(count),
                                  progress=False, **self.settings.sample_kwargs())

    def add(self, row: dict) -> dict:
        self.report["results"].append(row)
        save_json(self.report, self.args.out)
        say(f"[speed] {row['variant']}" + (f" batch {row['batch']}" if row.get("batch") else "")
            + f": {summary(row)}")
        return row


def say(*parts):
    print(*parts, flush=True)


def last_line(error: BaseException) -> str:
    """'TypeName: the last line of the message' that is not torch.compile's advice on
    how to see more (its errors end with the cause, then that advice)."""
    lines = [line for line in str(error).strip().splitlines()
             if line.strip() and not line.startswith(ADVICE)]
    return f"{type(error).__name__}: {lines[-1].strip()[:300]}" if lines else type(error).__name__


def machine(threads: int) -> dict:
    """The CPU model, cores, threads used, torch and the optional runtimes' versions."""
    versions = {package: installed(package) for package in ("onnxruntime", "openvino")}
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), **versions,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "allocator_tuned": allocator.tune()}


def installed(package: str) -> str | None:
    """The installed version of `package` ('2026.4.1'), or None; without importing it."""
    try:
        return importlib.metadata.version(package).split("-")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_model(model: DiffusionModel) -> str:
    c = model.config
    params = sum(p.numel() for p in model.unet.parameters())
    return (f"{params / 1e6:.2f}M-parameter {'conditional ' if model.conditional else ''}UNet, "
            f"{c.MODEL_CHANNELS} channels x {list(c.CHANNEL_MULT)}, attention {c.ATTENTION}, "
            f"{c.PREDICTION}-prediction, T = {c.TIMESTEPS}")


def build_model(args) -> DiffusionModel:
    """The checkpoint's model, or a fresh CPU-preset one whose weights are all random
    (seeded: the same in every process, for the subprocess variant's check)."""
    if args.checkpoint:
        from sampling.api import load_model  # only with --checkpoint: it loads the sampling API

        return load_model(args.checkpoint, device="cpu")
    changes = dict(TIMESTEPS=DRY["timesteps"], SAMPLING_STEPS=DRY["steps"]) if args.dry_run else {}
    torch.manual_seed(0)
    model = DiffusionModel.from_config(Config.from_preset("cpu", **changes))
    for module in model.unet.modules():  # zero-initialised layers: random too
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)) and not module.weight.any():
            module.reset_parameters()
    return model.eval().requires_grad_(False)


# ----- the variants: each returns (model to draw with, context of the draw, notes) -----
def prepare_eager(m: Measurement):
    return m.model, contextlib.nullcontext, ""


def prepare_inference_mode(m: Measurement):
    return m.model, torch.inference_mode, ""


def prepare_channels_last(m: Measurement):
    model = copy.deepcopy(m.model)
    model.unet = fast.ChannelsLastUNet(model.unet)
    return model, contextlib.nullcontext, ""


def prepare_compile(m: Measurement):
    model = copy.deepcopy(m.model)
    # dynamic=False: one static graph per batch size, as a sampling run at one batch gets
    model.unet = torch.compile(model.unet, dynamic=False)
    return model, contextlib.nullcontext, ("compiles at the check's batch (in the setup "
                                           "time) and at each timed batch (in the warm-up)")


def _onnx_file(m: Measurement) -> tuple[Path, str]:
    """The UNet as ONNX, exported once for both runtimes, and a note of the exporter."""
    path = m.work / "unet.onnx"
    if m.exporter is None:
        m.exporter = fast.export_onnx(m.model, path)
    return path, f"{m.exporter} ONNX export"


def prepare_onnxruntime(m: Measurement):
    fast.require("onnxruntime")
    path, note = _onnx_file(m)
    model = copy.deepcopy(m.model)
    model.unet = fast.OnnxRuntimeUNet(path, model.num_classes, m.args.threads)
    return model, contextlib.nullcontext, f"onnxruntime {installed('onnxruntime')}; {note}"


def prepare_openvino(m: Measurement):
    fast.require("openvino")
    path, note = _onnx_file(m)
    model = copy.deepcopy(m.model)
    model.unet = fast.OpenVinoUNet(path, model.num_classes, m.args.threads)
    return model, contextlib.nullcontext, f"openvino {installed('openvino')}; {note}"


PREPARE = {"eager": prepare_eager, "inference-mode": prepare_inference_mode,
           "channels-last": prepare_channels_last, "compile": prepare_compile,
           "onnxruntime": prepare_onnxruntime, "openvino": prepare_openvino}


# ----- measuring -----
def check(m: Measurement, model, context) -> dict:
    """Max |difference| from eager: of the first --check images, and of one UNet call."""
    images = m.draw(model, m.args.check, m.args.check, context)
    with context(), torch.no_grad():
        unet_out = model.unet(*m.unet_inputs)
    return {"max_diff": float((images - m.reference).abs().max()),
            "unet_max_diff": float((unet_out - m.unet_reference).abs().max())}


def time_batch(m: Measurement, model, context, batch: int) -> dict:
    """One warm-up draw of `batch` images, then --repeats timed draws of --count."""
    start = time.perf_counter()
    m.draw(model, batch, batch, context)
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(m.args.repeats):
        before, start = os.times(), time.perf_counter()
        m.draw(model, m.args.count, batch, context)
        seconds, after = time.perf_counter() - start, os.times()
        runs.append({"seconds": seconds, "images_per_s": m.args.count / seconds,
                     "user_s": after.user - before.user,
                     "system_s": after.system - before.system})
    rates = [r["images_per_s"] for r in runs]
    user, system = sum(r["user_s"] for r in runs), sum(r["system_s"] for r in runs)
    return {"batch": batch, "images_per_s_best": max(rates),
            "images_per_s_median": statistics.median(rates),
            "seconds_per_10000": QUOTED / max(rates), "user_s": user,
            "system_s": system, "system_share": system / (user + system) if user + system else 0.0,
            # CPU time per image: less swayed than the wall clock by other processes
            "cpu_ms_per_image": 1000 * (user + system) / (m.args.count * m.args.repeats),
            "warmup_s": warmup_s, "runs": runs}


def verdict(m: Measurement, diffs: dict) -> str:
    if diffs["max_diff"] > m.args.tolerance or diffs["unet_max_diff"] > UNET_TOLERANCE:
        return "mismatch"
    return "ok"


def run_variant(m: Measurement, name: str) -> list[dict]:
    """Prepare, check and time one in-process variant; a failure becomes a row (after
    the rows of the batches it finished)."""
    row, rows = {"variant": name}, []
    try:
        start = time.perf_counter()
        model, context, notes = PREPARE[name](m)
        row.update(prepare_s=time.perf_counter() - start, notes=notes)
        start = time.perf_counter()
        diffs = check(m, model, context)
        row.update(diffs, check_s=time.perf_counter() - start, status=verdict(m, diffs))
        for batch in m.args.batch_list:
            rows.append(m.add({**row, **time_batch(m, model, context, batch)}))
    except fast.NotInstalled as missing:
        rows.append(m.add({**row, "status": "not installed",
                           "notes": f"{missing.args[0]} cannot be imported"}))
    except Exception as error:  # noqa: BLE001 - recorded, and the other variants go on
        rows.append(m.add({**row, "status": "failed", "notes": last_line(error)}))
    gc.collect()
    return rows


def child_command(args, out: Path, images: Path) -> list[str]:
    """This script again, for eager alone, with the same sizes; its check images go to
    `images` and its report to `out`."""
    command = [sys.executable, "-m", "scripts.speed", "--variants", "eager",
               "--child-label", "default-malloc", "--check-out", str(images), "--out", str(out),
               "--count", str(args.count), "--batches", ",".join(map(str, args.batch_list)),
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--check", str(args.check), "--tolerance", str(args.tolerance)]
    if args.checkpoint:
        command += ["--checkpoint", str(args.checkpoint)]
    return command + (["--dry-run"] if args.dry_run else [])


def run_default_malloc(m: Measurement) -> list[dict]:
    """eager in a subprocess with MNIST_DIFFUSION_DEFAULT_MALLOC=1 (the tuning is per
    process and cannot be undone); its images are checked against this process's."""
    out, images = m.work / "default-malloc.json", m.work / "default-malloc.pt"
    env = {**os.environ, "MNIST_DIFFUSION_DEFAULT_MALLOC": "1"}
    say("[speed] default-malloc: in a subprocess ...")
    done = subprocess.run(child_command(m.args, out, images), cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode or not out.is_file():
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return [m.add({"variant": "default-malloc", "status": "failed",
                       "notes": f"exit {done.returncode}: {lines[-1][:300]}"})]
    child = json.loads(out.read_text())
    tuned = child["machine"]["allocator_tuned"]
    theirs = torch.load(images)
    diffs = {"max_diff": float((theirs["images"] - m.reference).abs().max()),
             "unet_max_diff": float((theirs["unet"] - m.unet_reference).abs().max())}
    rows = []
    for row in child["results"]:
        row["variant"] = "default-malloc"
        if row.get("images_per_s_best") is not None:  # else its notes say what failed
            row.update(diffs, status=verdict(m, diffs) if row["status"] == "ok" else row["status"],
                       notes=("glibc's default malloc thresholds" if not tuned else
                              "the allocator was tuned all the same (not glibc?)"))
        rows.append(m.add(row))
    return rows


# ----- the report -----
def summary(row: dict) -> str:
    if row.get("images_per_s_best") is None:
        return f"{row['status']}: {row.get('notes', '')}"
    return (f"{row['images_per_s_best']:.1f} images/s (median {row['images_per_s_median']:.1f}), "
            f"system {row['system_share']:.0%}, max diff {row['max_diff']:.1e}, "
            f"warm-up {row['warmup_s']:.1f} s" + ("" if row["status"] == "ok"
                                                  else f" [{row['status'].upper()}]"))


def _notes(row: dict) -> str:
    parts = [] if row.get("status") in ("ok", None) else [row["status"].upper()]
    if row.get("images_per_s_best") is not None:
        setup = row.get("prepare_s", 0) + row.get("check_s", 0)
        parts.append(f"setup {setup:.1f} s, warm-up {row['warmup_s']:.1f} s; "
                     f"UNet diff {row['unet_max_diff']:.0e}")
    parts.append(row.get("notes") or "")
    return "; ".join(p for p in parts if p).replace("|", "/")


def markdown(report: dict) -> str:
    mc, st = report["machine"], report["settings"]
    runtimes = ", ".join(f"{k} {mc[k]}" for k in ("onnxruntime", "openvino") if mc.get(k))
    lines = [f"CPU: {mc['cpu']} ({mc['cores']} cores), {mc['threads']} threads, torch "
             f"{mc['torch']}" + (f", {runtimes}" if runtimes else "")
             + f"; load average {mc['load_average'][0]:.1f} at the start",
             f"Model: {st['model']}; {st['sampler']}, guidance {st['guidance']:g}, "
             f"{st['network_evaluations_per_image']} network evaluations per image; "
             f"{st['count']:,} images per timed run, best of {st['repeats']}", "",
             "| variant | batch | images/s (best) | images/s (median) | s per 10,000 | "
             "system time | CPU ms/image | max diff from eager | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in report["results"]:
        if row.get("images_per_s_best") is None:
            lines.append(f"| {row['variant']} | - | - | - | - | - | - | - | {_notes(row)} |")
            continue
        lines.append(f"| {row['variant']} | {row['batch']} | {row['images_per_s_best']:.1f} | "
                     f"{row['images_per_s_median']:.1f} | {row['seconds_per_10000']:.0f} | "
                     f"{row['system_share']:.0%} | {row['cpu_ms_per_image']:.1f} | "
                     f"{row['max_diff']:.1e} | {_notes(row)} |")
    return "\n".join(lines) + "\n"


# ----- the command line -----
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--variants", default=",".join(VARIANTS),
                       help=f"comma-separated, in this order (default all): {','.join(VARIANTS)}")
    which.add_argument("--allocator", action="store_true",
                       help="eager and default-malloc only: what the allocator tuning is worth")
    parser.add_argument("--batches", help="batch sizes to time, comma-separated (default 100,500)")
    parser.add_argument("--count", type=int, help="images per timed run (default 2,000)")
    parser.add_argument("--repeats", type=int, help="timed runs per batch (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and "
                        "OpenVINO threads (default 2)")
    parser.add_argument("--checkpoint", help="sample this checkpoint's model (default: a fresh "
                        "CPU-preset model with random weights: the speed is the same)")
    parser.add_argument("--check", type=int, help="images compared with eager's (default 8)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="max |difference| from eager's images in [-1, 1] (default 1e-3)")
    parser.add_argument("--out", type=Path, default=Path("outputs/speed.json"),
                        help="the JSON report (default outputs/speed.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"tiny sizes (--count {DRY['count']} --batches {DRY['batches']} "
                             f"--repeats {DRY['repeats']}, {DRY['steps']} sampling steps), "
                             f"for the tests")
    parser.add_argument("--child-label", help=argparse.SUPPRESS)  # run_default_malloc's child
    parser.add_argument("--check-out", type=Path, help=argparse.SUPPRESS)
    return parser


def settle(args):
    """Fill the defaults (--dry-run's or the real ones) and check the values."""
    defaults = dict(count=DRY["count"], repeats=DRY["repeats"], check=4, batches=DRY["batches"]
                    ) if args.dry_run else dict(count=2000, repeats=2, check=8, batches="100,500")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches {args.batches}: expected whole numbers, e.g. 100,500") from None
    for flag, value in [("--count", args.count), ("--repeats", args.repeats),
                        ("--threads", args.threads), ("--check", args.check),
                        ("--batches", min(args.batch_list, default=0))]:
        if value < 1:
            raise UsageError(f"{flag} must be at least 1")
    names = ["eager", "default-malloc"] if args.allocator else [
        v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UsageError(f"unknown --variants {','.join(unknown)}; expected some of "
                         f"{','.join(VARIANTS)}")
    args.variant_list = names
    return args


def run(args) -> int:
    args = settle(args)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    with tempfile.TemporaryDirectory(prefix="speed-") as work:
        m = Measurement(args, model, Path(work))
        m.reference = m.draw(model, args.check, args.check)  # eager's: what all must match
        if args.check_out:  # for the parent of run_default_malloc
            torch.save({"images": m.reference, "unet": m.unet_reference}, args.check_out)
        if not args.child_label:
            mc = m.report["machine"]
            say(f"[speed] {mc['cpu']}, {mc['cores']} cores, {args.threads} threads, torch "
                f"{mc['torch']}; {m.report['settings']['model']}; {m.settings.label}")
        for name in args.variant_list:
            run_variant(m, name) if name != "default-malloc" else run_default_malloc(m)
        save_json(m.report, args.out)
    if not args.child_label:
        say(f"\nwrote {args.out}\n\n" + markdown(m.report))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
