"""`python -m scripts.gpu_report --out DIR`: the default model on one GPU, in one command.

Six stages, each wrapped so that a failure is recorded with its error's last line
and the next stage still runs; every result is written to DIR/report.json and
DIR/report.md the moment it exists, so a run killed half-way keeps what it finished:

  cuda_tests       pytest tests/test_cuda.py (its log: DIR/pytest_cuda.log)
  benchmark        training speed of the default model at batch 128 (training/benchmark.py):
                   eager, --channels-last, --compile; then the fastest at batch 512 and
                   2048 ('batch_sweep', run second to last: a short budget gives it up)
  time_to_quality  the default model with the fastest correct settings: FID and confident
                   fraction at 30, 60, 120 and 240 s of training (2,000 samples; 10,000 at
                   the end), on one Trainer that is continued stretch by stretch
  sampling         10,000 digits with the default sampler in fp32 and bf16, timed end to
                   end after a warm-up at the same batch; DDPM-1000 on 1,000 digits as the
                   quality reference
  budget_recipe    the CPU preset's budget recipe on the default model (issue 13): a fresh
                   run of 60 s whose learning rate decays linearly to 0 over the budget,
                   sampled from the power EMA, then the same with --conditional (also its
                   conditional accuracy); FID on 2,000 samples beside the flat schedule's at
                   the same mark of time_to_quality. Run last: the first to give way to a
                   short budget; `--stages time_to_quality,budget_recipe` runs it with its
                   comparison

The whole run keeps to --budget-s (default 510 s on a GPU): a measurement that would
not fit is recorded as skipped. --dry-run runs every stage on the CPU with a tiny model
and budgets of seconds (tests/test_gpu_report.py runs it, so the script cannot rot).
What the stages train is written under --work-dir (default DIR/work, removed at the end).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python scripts/NAME.py): the repo on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import PRESETS, Config
from models.diffusion import DiffusionModel
from evaluation.metrics import Evaluator
from training.benchmark import benchmark_sampling, benchmark_training
from training.trainer import Trainer, TrainingInterrupted
from utils.datasets import open_dataset
from utils.files import save_json

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("cuda_tests", "benchmark", "batch_sweep", "time_to_quality", "budget_recipe",
          "sampling")  # as shown
RUN_ORDER = ("cuda_tests", "benchmark", "time_to_quality", "sampling", "batch_sweep",
             "budget_recipe")
TITLES = {"cuda_tests": "CUDA tests", "benchmark": "training speed",
          "batch_sweep": "training speed", "time_to_quality": "time to quality",
          "budget_recipe": "time to quality", "sampling": "sampling"}
BUDGET_RECIPE = ("LR_SCHEDULE", "EMA_RULE", "EMA_STD")  # the CPU preset's, for budget_recipe


@dataclass(frozen=True)
class Plan:
    """The size of every stage: GPU for the real run, DRY for --dry-run."""
    device: str
    model: dict  # Config changes from the default model (none on the GPU)
    variants: tuple  # (name, Config changes) compared at `batch`
    batch: int  # the batch of the comparison: the default BATCH_SIZE
    sweep: tuple  # further batches for the fastest variant
    warmup_images: int  # warm-up images per speed measurement (3 .. 30 steps)
    timed_images: int  # timed images per speed measurement (within one epoch)
    estimate_s: dict  # expected seconds of one speed measurement, by variant (at least)
    marks: tuple  # seconds of training at which quality is measured
    eval_samples: int  # samples per quality measurement ...
    final_eval_samples: int  # ... and at the last mark
    sample_count: int  # digits of the timed sampling runs
    sample_batch: int
    reference_count: int  # digits sampled by DDPM over all timesteps
    budget_s: float  # the whole run
    tests_timeout_s: float
    quality_overhead_s: float  # time_to_quality beyond its training: evaluations, saving
    sampling_s: float  # what the sampling stage needs
    recipe_s: float  # the budget of each budget_recipe run (a mark of time_to_quality)
    compile: bool = True  # False: the compile variant is skipped (minutes on a CPU)


GPU = Plan(device="cuda", model={},
           variants=(("eager", {}), ("channels-last", {"CHANNELS_LAST": True}),
                     ("compile", {"COMPILE": True})),
           batch=128, sweep=(512, 2048), warmup_images=3840, timed_images=25_600,
           estimate_s={"eager": 15, "channels-last": 15, "compile": 60},
           marks=(30, 60, 120, 240), eval_samples=2000, final_eval_samples=10_000,
           sample_count=10_000, sample_batch=10_000, reference_count=1000,
           budget_s=510, tests_timeout_s=150, quality_overhead_s=40, sampling_s=60,
           recipe_s=60)

DRY = dataclasses.replace(
    GPU, device="cpu",
    model=dict(MODEL_CHANNELS=8, TIME_EMBED_DIM=16, NUM_RES_BLOCKS=1, TIMESTEPS=50,
               TRAIN_SIZE=512, SAMPLING_STEPS=5, THREADS=1),  # 1: immune to busy cores
    batch=16, sweep=(32, 64), warmup_images=16, timed_images=128,
    estimate_s={"eager": 2, "channels-last": 2, "compile": 2},
    marks=(1, 2), eval_samples=20, final_eval_samples=50, sample_count=40,
    sample_batch=20, reference_count=10, budget_s=300, tests_timeout_s=120,
    quality_overhead_s=5, sampling_s=5, recipe_s=1, compile=False)


class Stopped(BaseException):
    """SIGTERM or SIGINT: stop after recording where the run was."""


class StageFailed(Exception):
    """Some measurements of a stage failed (each recorded in its own row)."""


def _last_line(error: BaseException) -> str:
    """The traceback's last line: 'ValueError: message' (a long message's first line)."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300]}" if message else type(error).__name__


def _say(*parts):
    print(*parts, flush=True)


# ----- the report: JSON and Markdown, rewritten after every change -----
class Report:
    """DIR/report.json and DIR/report.md; `add` writes both before it returns."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.data = {"header": header,
                     "stages": {name: {"status": "not run", "rows": []} for name in STAGES}}
        self.write()

    def stage(self, name: str) -> dict:
        return self.data["stages"][name]

    def set_status(self, name: str, status: str, error: str | None = None, **values):
        self.stage(name).update(status=status, error=error, **values)
        self.write()

    def add(self, name: str, setting: str, result: str, **values) -> dict:
        row = {"setting": setting, "result": result, **values}
        self.stage(name)["rows"].append(row)
        self.write()
        _say(f"[{name}] {setting}: {result}")
        return row

    def write(self):
        self.out.mkdir(parents=True, exist_ok=True)
        for path, write in [(self.out / "report.json", lambda p: save_json(self.data, p)),
                            (self.out / "report.md", lambda p: p.write_text(self.markdown()))]:
            tmp = path.with_name(f".{path.name}.tmp")
            write(tmp)
            os.replace(tmp, path)

    def markdown(self) -> str:
        h = self.data["header"]
        kind = "Dry run (CPU, tiny model, budgets of seconds)" if h["dry_run"] else "GPU report"
        lines = [f"#### {kind}: {h['device_name']}, torch {h['torch']}"
                 + (f", CUDA {h['cuda']}" if h.get("cuda") else "")
                 + f", commit {h['commit']}, {h['date']}",
                 "", f"Command: `{h['command']}` ({h['budget_s']:.0f} s budget; "
                 f"took {h.get('seconds', 0):.0f} s). Model: {h['model']}.", "",
                 "| stage | setting | result |", "| --- | --- | --- |"]
        for name in STAGES:
            stage = self.stage(name)
            title = TITLES[name]
            for row in stage["rows"]:
                lines.append(f"| {title} | {row['setting']} | {row['result']} |")
            status = stage["status"]
            if status == "failed":
                lines.append(f"| {title} | ({name}) | FAILED: {_cell(stage['error'])} |")
            elif status == "running":  # a finished report with a running stage: killed here
                lines.append(f"| {title} | ({name}) | unfinished: the run stopped here |")
            elif status != "ok":
                error = f": {_cell(stage['error'])}" if stage.get("error") else ""
                lines.append(f"| {title} | ({name}) | {status}{error} |")
        return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


class Run:
    """What the stages share: the plan, the report, the clock and what earlier stages found."""

    def __init__(self, plan: Plan, report: Report, data_dir: Path, work: Path, out: Path):
        self.plan, self.report, self.data_dir, self.work, self.out = plan, report, data_dir, work, out
        self.deadline = time.monotonic() + plan.budget_s
        self.failed_tests: list[str] = []
        self.test_seconds: dict[str, float] = {}  # CUDA test -> its duration
        self.speeds: dict[str, dict] = {}  # variant -> benchmark result at plan.batch
        self.flops: float | None = None
        self.trainer = None  # time_to_quality's, for sampling
        self.evaluator = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def base_config(self, **changes):
        work = self.work
        settings = {"BATCH_SIZE": self.plan.batch, **self.plan.model, **changes}
        return Config(**settings, DEVICE=self.plan.device,
                      DATA_DIR=str(self.data_dir), DOWNLOAD=False,
                      CHECKPOINT_DIR=str(work / "checkpoints"), OUTPUT_DIR=str(work / "outputs"),
                      EPOCHS=100_000, SAVE_EVERY=100_000, EVAL_EVERY=0).validate()

    def best_variant(self) -> tuple[str, dict]:
        """The fastest variant at plan.batch whose CUDA tests passed; eager if none was measured."""
        correct = {name: r for name, r in self.speeds.items()  # test ids end in [variant]
                   if not any(test.endswith(f"[{name}]") for test in self.failed_tests)}
        if not correct:
            return "eager", {}
        name = max(correct, key=lambda n: correct[n]["train_images_per_s"])
        return name, dict(self.plan.variants)[name]

    def get_evaluator(self):
        if self.evaluator is None:
            self.evaluator = Evaluator(open_dataset("mnist", self.data_dir, download=False),
                                       device=self.plan.device, progress=False, log=_say)
        return self.evaluator


def _free_memory():
    """Give back what dropped models held (the CUDA cache too), before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- stage: the CUDA tests -----
def stage_cuda_tests(run: Run):
    log, xml = run.out / "pytest_cuda.log", run.work / "pytest_cuda.xml"
    timeout = max(10.0, min(run.plan.tests_timeout_s, run.remaining() - 60))
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
               "-n", "0", "tests/test_cuda.py", f"--junitxml={xml}"]  # one file: no workers
    env = {**os.environ, "MNIST_DATA_DIR": str(run.data_dir.resolve()), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        with open(log, "w") as f:
            for line in process.stdout:
                f.write(line)
                f.flush()
                _say("  | " + line.rstrip())
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
    seconds = time.perf_counter() - start
    if not xml.is_file():
        raise RuntimeError(f"pytest exited with {code} and no results after {seconds:.0f} s "
                           f"(timeout {timeout:.0f} s); see pytest_cuda.log")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        run.test_seconds[case.get("name")] = float(case.get("time", 0))
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failed.append((case.get("name"), message[0][:200] if message else ""))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    run.failed_tests = [name for name, _ in failed]
    run.report.add("cuda_tests", "`pytest tests/test_cuda.py`",
                   f"{passed} passed, {len(failed)} failed, {counts['skipped']} skipped "
                   f"({seconds:.0f} s)", passed=passed, failed=len(failed),
                   skipped=counts["skipped"], seconds=seconds, failed_tests=run.failed_tests)
    for name, message in failed:
        run.report.add("cuda_tests", f"FAILED {name}", _cell(message))
    if failed:
        raise StageFailed(f"{len(failed)} CUDA tests failed: {', '.join(run.failed_tests)}")
    if code not in (0, 5):  # 5: nothing collected ran, e.g. all skipped
        raise RuntimeError(f"pytest exited with {code}; see pytest_cuda.log")


# ----- stage: training speed -----
def _measure_training(run: Run, config) -> dict:
    """benchmark_training on a fresh Trainer; the memory is freed afterwards."""
    trainer = Trainer(config, progress=False, log=lambda *a: None)
    try:
        batch = config.BATCH_SIZE
        warmup = max(3, min(30, run.plan.warmup_images // batch))
        # timed steps within the first epoch: no smaller last batch, so no recompile
        timed = max(2, min(run.plan.timed_images // batch, len(trainer.batcher) - warmup - 1))
        result = benchmark_training(trainer, warmup, timed, log=_say, flops=run.flops)
    finally:
        del trainer
        _free_memory()
    run.flops = run.flops or result["train_flops_per_image"]
    return result


def _memory(mb: float, device: str) -> str:
    return f"peak memory {mb:,.0f} MB" + (" (process max RSS)" if device == "cpu" else "")


def _speed_row(run: Run, stage: str, name: str, result: dict):
    share = (f" = {result['fraction_of_bf16_peak']:.1%} of the {result['bf16_peak_card']}'s "
             f"bf16 peak" if result["fraction_of_bf16_peak"] else " (no bf16 peak known here)")
    run.report.add(stage, f"{name}, batch {result['batch_size']}, {result['precision']}",
                   f"{result['train_images_per_s']:,.0f} img/s "
                   f"({result['train_seconds_per_epoch']:.1f} s/epoch); "
                   f"{result['achieved_flops_per_s'] / 1e12:.2f} TFLOP/s{share}; "
                   f"{_memory(result['train_peak_memory_mb'], run.plan.device)}; "
                   f"{result['warmup_steps']} warm-up steps took {result['warmup_seconds']:.1f} s",
                   variant=name, **result)


def _attempt(run: Run, stage: str, setting: str, estimate: float, measure) -> bool:
    """Run one measurement if it fits the budget (leaving the reserve of later stages);
    a failure is recorded in its own row. Returns whether it failed."""
    reserve = _reserve_after(run, stage)
    if run.remaining() - reserve < estimate:
        run.report.add(stage, setting, f"skipped: out of time ({run.remaining():.0f} s left, "
                                        f"{reserve:.0f} s kept for later stages)", skipped=True)
        return False
    try:
        measure()
        return False
    except (Stopped, KeyboardInterrupt):
        raise
    except Exception as error:
        traceback.print_exc()
        run.report.add(stage, setting, f"FAILED: {_cell(_last_line(error))}", failed=True)
        return True


def _reserve_after(run: Run, stage: str) -> float:
    """Seconds that the stages after `stage` (in run order) need."""
    later = RUN_ORDER[RUN_ORDER.index(stage) + 1:]
    need = 0.0
    if "time_to_quality" in later:
        need += run.plan.marks[-1] + run.plan.quality_overhead_s
    if "sampling" in later:
        need += run.plan.sampling_s
    return need


def _estimate(run: Run, variant: str) -> float:
    """Seconds one speed measurement of `variant` should take: the plan's figure, or for
    compile twice what compiling the tiny model took in the CUDA tests, if more."""
    compiled = [t for name, t in run.test_seconds.items() if "compile" in name]
    if variant == "compile" and compiled:
        return max(run.plan.estimate_s[variant], 2 * max(compiled))
    return run.plan.estimate_s[variant]


def stage_benchmark(run: Run):
    failures = 0
    for name, changes in run.plan.variants:
        setting = f"{name}, batch {run.plan.batch}"
        if name == "compile" and not run.plan.compile:
            run.report.add("benchmark", setting, "skipped: compiling takes minutes on a CPU "
                                                 "(dry run)", skipped=True)
            continue

        def measure(name=name, changes=changes):
            result = _measure_training(run, run.base_config(**changes))
            run.speeds[name] = result
            _speed_row(run, "benchmark", name, result)

        failures += _attempt(run, "benchmark", setting, _estimate(run, name), measure)
    if failures:
        raise StageFailed(f"{failures} of {len(run.plan.variants)} measurements failed")


def stage_batch_sweep(run: Run):
    run.trainer = None  # time_to_quality's model is done with: free its memory first
    _free_memory()
    name, changes = run.best_variant()
    failures = 0
    for batch in run.plan.sweep:
        def measure(batch=batch):
            result = _measure_training(run, run.base_config(BATCH_SIZE=batch, **changes))
            _speed_row(run, "batch_sweep", f"{name} (fastest at {run.plan.batch})", result)

        failures += _attempt(run, "batch_sweep", f"{name}, batch {batch}", _estimate(run, name),
                             measure)
    if failures:
        raise StageFailed(f"{failures} of {len(run.plan.sweep)} measurements failed")


# ----- stage: time to quality -----
def stage_time_to_quality(run: Run):
    """One Trainer, continued to each mark: its MAX_MINUTES (run control, which a resumed
    run may change too) is raised stretch by stretch, so the UNet is compiled once and the
    run is the same as one uninterrupted run (evaluation time is not training time)."""
    name, changes = run.best_variant()
    plan = run.plan
    trainer = Trainer(run.base_config(**changes), progress=False, log=_say,
                      evaluator=run.get_evaluator())
    run.trainer = trainer
    for i, mark in enumerate(plan.marks):
        last = i + 1 == len(plan.marks)
        samples = plan.final_eval_samples if last else plan.eval_samples
        setting = f"{mark:g} s of training"
        needed = (mark - trainer.elapsed + plan.quality_overhead_s / 2
                  + _reserve_after(run, "time_to_quality"))
        if run.remaining() < needed:
            run.report.add("time_to_quality", setting,
                           f"not reached: out of time ({run.remaining():.0f} s left)", skipped=True)
            break
        trainer.extend(MAX_MINUTES=mark / 60, EVAL_SAMPLES=samples)
        trainer.fit()
        record = trainer.evaluate()
        run.report.add(
            "time_to_quality",
            f"{setting} ({record['train_seconds']:.1f} s trained: {record['step']:,} steps, "
            f"{record['epoch']:.1f} epochs; {name}"
            f"{' (compiling included)' if name == 'compile' else ''}, "
            f"batch {trainer.config.BATCH_SIZE}, {trainer.precision}), {record['sampler']}",
            f"FID {record['fid']:.2f} (real digits: {record['fid_floor']:.2f}) on "
            f"{samples:,} samples; {record['confident_fraction']:.1%} classified with p > 0.9; "
            f"class KL {record['class_kl']:.3f}",
            mark_s=mark, variant=name, **record)
    grid = Path(trainer.config.OUTPUT_DIR) / "samples_final.png"
    if grid.is_file():
        shutil.copy(grid, run.out / "samples_time_to_quality.png")


# ----- stage: sampling -----
def stage_sampling(run: Run):
    plan = run.plan
    if run.trainer is not None:
        model, config = run.trainer.ema, run.trainer.config
        trained = f"the model of time_to_quality ({run.trainer.step:,} steps)"
    else:
        config = run.base_config()
        model = DiffusionModel.from_config(config).to(config.DEVICE).eval()
        trained = "an UNTRAINED model (time_to_quality did not run): speed only"
    run.report.add("sampling", "model", trained)
    evaluator = run.get_evaluator()
    steps = None if config.SAMPLER == "ddpm" else config.SAMPLING_STEPS
    name = f"{config.SAMPLER}-{steps or config.TIMESTEPS}"
    name += f" eta {config.ETA:g}" if config.ETA else ""
    kept = {}
    failures = 0
    for precision in ("fp32", "bf16"):
        setting = (f"{name}, {precision}, {plan.sample_count:,} digits, batch {plan.sample_batch:,}"
                   f", end to end after a warm-up batch")

        def measure(precision=precision, setting=setting):
            result = benchmark_sampling(model, plan.sample_count, plan.sample_batch, precision,
                                        config.SAMPLER, steps, config.ETA, config.SPACING, log=_say)
            images = result.pop("images")
            kept[precision] = images[:plan.reference_count]
            score = evaluator.evaluate(images, memorisation=False, precision_recall_k=None)
            run.report.add("sampling", setting,
                           f"{result['images_per_s']:,.0f} img/s ({result['seconds']:.1f} s); "
                           f"FID {score['fid']:.2f} (real digits: {score['floor']['fid']:.2f}); "
                           f"{score['confident_fraction']:.1%} with p > 0.9; "
                           f"{_memory(result['peak_memory_mb'], plan.device)}",
                           fid=score["fid"], fid_floor=score["floor"]["fid"],
                           confident_fraction=score["confident_fraction"], **result)

        failures += _attempt(run, "sampling", setting, 5, measure)

    def reference():
        device = model.scheduler.betas.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        images = model.generate(plan.reference_count, batch_size=plan.reference_count,
                                progress=False, sampler="ddpm", seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        score = evaluator.evaluate(images, memorisation=False, precision_recall_k=None)
        text = (f"FID {score['fid']:.2f} (real digits: {score['floor']['fid']:.2f}); "
                f"{score['confident_fraction']:.1%} with p > 0.9; {seconds:.1f} s")
        same = {}
        if "fp32" in kept:
            same = evaluator.evaluate(kept["fp32"], floor=False, memorisation=False,
                                      precision_recall_k=None)
            text += f". {name} fp32 on the same {plan.reference_count:,}: FID {same['fid']:.2f}"
        run.report.add("sampling", f"ddpm-{model.timesteps}, fp32, {plan.reference_count:,} "
                                   f"digits (the quality reference)", text,
                       fid=score["fid"], fid_floor=score["floor"]["fid"],
                       confident_fraction=score["confident_fraction"], seconds=seconds,
                       default_sampler_fid_same_count=same.get("fid"))

    failures += _attempt(run, "sampling", f"ddpm-{model.timesteps} reference", 5, reference)
    if failures:
        raise StageFailed(f"{failures} sampling measurements failed")


# ----- stage: the budget recipe on the default model -----
def stage_budget_recipe(run: Run):
    """Fresh runs of plan.recipe_s seconds with the budget recipe (decay to 0 at the end,
    power EMA), unconditional and conditional, each scored on plan.eval_samples digits
    like time_to_quality's flat schedule at the same mark (if it got there)."""
    run.trainer = None  # sampling, which ran before, is done with time_to_quality's model
    _free_memory()
    name, changes = run.best_variant()
    plan = run.plan
    recipe = {key: PRESETS["cpu"][key] for key in BUDGET_RECIPE}
    flat = next((row for row in run.report.stage("time_to_quality")["rows"]
                 if row.get("mark_s") == plan.recipe_s and "fid" in row), None)
    failures = 0
    for label, extra in (("linear decay to 0 + power EMA", {}),
                         ("the same, --conditional", {"CONDITIONAL": True})):
        setting = f"{plan.recipe_s:g} s budget, {label}"

        def measure(extra=extra, setting=setting):
            folder = run.work / f"recipe{len(run.report.stage('budget_recipe')['rows'])}"
            config = run.base_config(**changes, **recipe, **extra,
                                     MAX_MINUTES=plan.recipe_s / 60, EVAL_SAMPLES=plan.eval_samples,
                                     ).replace(CHECKPOINT_DIR=str(folder), OUTPUT_DIR=str(folder))
            trainer = Trainer(config, progress=False, log=_say, evaluator=run.get_evaluator())
            try:
                trainer.fit()
                record = trainer.evaluate()
            finally:
                del trainer
                _free_memory()
            result = (f"FID {record['fid']:.2f} (real digits: {record['fid_floor']:.2f}) on "
                      f"{plan.eval_samples:,} samples; {record['confident_fraction']:.1%} "
                      f"classified with p > 0.9")
            if record.get("conditional_accuracy") is not None:
                result += (f"; {record['conditional_accuracy']:.1%} the digit asked for "
                           f"(guidance {config.GUIDANCE:g})")
            result += (f"; flat schedule at {plan.recipe_s:g} s: FID {flat['fid']:.2f}"
                       if flat else "; the flat schedule did not reach this mark")
            run.report.add("budget_recipe",
                           f"{setting} ({record['train_seconds']:.1f} s trained: "
                           f"{record['step']:,} steps; {name}, batch {config.BATCH_SIZE}), "
                           f"{record['sampler']}", result, mark_s=plan.recipe_s, variant=name,
                           conditional=bool(extra), flat_fid=flat and flat["fid"], **record)

        failures += _attempt(run, "budget_recipe", setting,
                             plan.recipe_s + plan.quality_overhead_s / 2, measure)
    if failures:
        raise StageFailed(f"{failures} of 2 budget-recipe runs failed")


STAGE_FUNCTIONS = {"cuda_tests": stage_cuda_tests, "benchmark": stage_benchmark,
                   "batch_sweep": stage_batch_sweep, "time_to_quality": stage_time_to_quality,
                   "sampling": stage_sampling, "budget_recipe": stage_budget_recipe}


def run_stage(run: Run, name: str, function=None) -> bool:
    """Run one stage, recording ok / failed (with the error's last line); returns False
    when the run was told to stop (SIGTERM, SIGINT)."""
    function = function or STAGE_FUNCTIONS[name]
    _say(f"\n=== {name} ({run.remaining():.0f} s of the budget left) ===")
    run.report.set_status(name, "running")
    start = time.perf_counter()
    try:
        function(run)
    except (Stopped, KeyboardInterrupt, TrainingInterrupted) as stop:
        run.report.set_status(name, "interrupted", _last_line(stop),
                              seconds=time.perf_counter() - start)
        return False
    except Exception as error:
        traceback.print_exc()
        run.report.set_status(name, "failed", _last_line(error), seconds=time.perf_counter() - start)
        return True
    run.report.set_status(name, "ok", seconds=time.perf_counter() - start)
    return True


def _header(plan: Plan, argv: list[str], dry_run: bool) -> dict:
    on_gpu = plan.device == "cuda" and torch.cuda.is_available()
    config = Config(**plan.model, DEVICE="cpu")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"command": "python -m scripts.gpu_report " + " ".join(argv), "dry_run": dry_run,
            "device_name": torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "cuda": torch.version.cuda if on_gpu else None,
            "commit": commit, "date": datetime.date.today().isoformat(),
            "budget_s": plan.budget_s,
            "model": (f"{config.MODEL_CHANNELS} channels x {list(config.CHANNEL_MULT)}, "
                      f"{config.NUM_RES_BLOCKS} res blocks, attention {config.ATTENTION}, "
                      f"T = {config.TIMESTEPS}" + (" (tiny)" if plan.model else " (the default)"))}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.gpu_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for report.json, report.md, pytest_cuda.log and a sample grid")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU with a tiny model, in seconds")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="folder holding MNIST/raw/ (default: the checkout's data/)")
    parser.add_argument("--work-dir", type=Path,
                        help="where the stages' checkpoints and outputs go (default: OUT/work, "
                             "removed at the end)")
    parser.add_argument("--budget-s", type=float,
                        help=f"seconds for the whole run (default: {GPU.budget_s:g} on a GPU)")
    parser.add_argument("--stages", default=",".join(RUN_ORDER),
                        help=f"comma-separated subset of {','.join(RUN_ORDER)}")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in RUN_ORDER]
    if unknown:
        print(f"gpu_report: error: unknown --stages {', '.join(unknown)}; expected some of "
              f"{', '.join(RUN_ORDER)}", file=sys.stderr)
        return 2
    plan = DRY if args.dry_run else GPU
    if args.budget_s:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("gpu_report: error: CUDA is not available on this machine; use --dry-run for the "
              "CPU rehearsal", file=sys.stderr)
        return 2
    if plan.model.get("THREADS"):
        torch.set_num_threads(plan.model["THREADS"])
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    out = args.out
    work = args.work_dir or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = Report(out, _header(plan, argv, args.dry_run))
    run = Run(plan, report, args.data_dir, work, out)
    code = 0
    try:
        try:  # checks the data before the tests; a failure shows in the stages too
            open_dataset("mnist", args.data_dir, download=False).load("train")
        except Exception as error:
            report.data["header"]["data_error"] = _last_line(error)
            _say(f"MNIST: {_last_line(error)}")
        for name in RUN_ORDER:
            if name not in stages:
                report.set_status(name, "not run (not in --stages)")
                continue
            if not run_stage(run, name):
                code = 143
                break
        for name in RUN_ORDER:
            if report.stage(name)["status"] == "not run":
                report.set_status(name, "not run (interrupted)" if code else "not run")
    except Stopped:
        code = 143
    finally:
        report.data["header"]["seconds"] = time.monotonic() - started
        report.write()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    _say(f"\nwrote {out / 'report.json'} and {out / 'report.md'} "
         f"({time.monotonic() - started:.0f} s)\n")
    _say((out / "report.md").read_text())
    failed = [n for n in RUN_ORDER if report.stage(n)["status"] == "failed"]
    return code or (1 if failed else 0)


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
