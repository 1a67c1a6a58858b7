"""scripts/gpu_report.py: the dry run (every stage, on the CPU, tiny) writes a report with
every stage, and a failing stage is recorded while the next one still runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import gpu_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    done = subprocess.run([sys.executable, "-m", "scripts.gpu_report", "--dry-run", "--out", str(out),
                           "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return out, done


@pytest.mark.slow
def test_dry_run_reports_every_stage(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["header"]["dry_run"] is True
    stages = report["stages"]
    assert list(stages) == list(gpu_report.STAGES)
    for name, stage in stages.items():
        assert stage["status"] == "ok", (name, stage)
        assert stage["rows"], name
    # every planned measurement has a row, with numbers behind it
    assert stages["cuda_tests"]["rows"][0]["skipped"] > 0  # collected, skipped without CUDA
    speeds = {row["variant"]: row for row in stages["benchmark"]["rows"] if "variant" in row}
    assert set(speeds) == {"eager", "channels-last"}  # compile: skipped on a CPU
    assert all(row["train_images_per_s"] > 0 and row["train_peak_memory_mb"] > 0
               for row in speeds.values())
    assert [row["batch_size"] for row in stages["batch_sweep"]["rows"]] == list(gpu_report.DRY.sweep)
    marks = [row["mark_s"] for row in stages["time_to_quality"]["rows"]]
    assert marks == list(gpu_report.DRY.marks)
    quality = stages["time_to_quality"]["rows"]
    assert all(row["fid"] > row["fid_floor"] >= 0 and 0 <= row["confident_fraction"] <= 1
               for row in quality)
    assert [row["train_seconds"] >= row["mark_s"] for row in quality] == [True] * len(quality)
    assert [row["num_samples"] for row in quality][-2:] == [gpu_report.DRY.eval_samples,
                                                            gpu_report.DRY.final_eval_samples]
    recipe = stages["budget_recipe"]["rows"]  # the budget recipe beside the flat schedule
    flat = next(row["fid"] for row in quality if row["mark_s"] == gpu_report.DRY.recipe_s)
    assert [row["conditional"] for row in recipe] == [False, True]
    assert all(row["flat_fid"] == flat and row["fid"] > 0 and row["num_samples"] ==
               gpu_report.DRY.eval_samples and row["train_seconds"] >= gpu_report.DRY.recipe_s
               for row in recipe)
    assert "conditional_accuracy" not in recipe[0]
    assert 0 <= recipe[1]["conditional_accuracy"] <= 1
    sampling = stages["sampling"]["rows"]
    assert [row.get("precision") for row in sampling if "images_per_s" in row] == ["fp32", "bf16"]
    assert sampling[-1]["fid"] > 0 and sampling[-1]["default_sampler_fid_same_count"] > 0
    assert (out / "pytest_cuda.log").is_file() and (out / "samples_time_to_quality.png").is_file()
    assert not (out / "work").exists()  # the scratch folder is removed


@pytest.mark.slow
def test_dry_run_markdown_is_one_table_with_every_stage(dry_run):
    out, _ = dry_run
    text = (out / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| stage | setting | result |"
    assert all(line.count("|") == 4 for line in table), table
    for title in set(gpu_report.TITLES.values()):
        assert any(line.startswith(f"| {title} |") for line in table), title
    assert "Dry run" in text and "python -m scripts.gpu_report --dry-run" in text
    assert "FAILED" not in text


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    header = {"dry_run": True, "device_name": "CPU", "torch": "x", "commit": "c", "date": "d",
              "command": "c", "budget_s": 10, "model": "m"}
    report = gpu_report.Report(tmp_path, header)
    run = gpu_report.Run(gpu_report.DRY, report, tmp_path, tmp_path / "work", tmp_path)

    def broken(run):
        run.report.add("benchmark", "eager", "half a result")
        raise ValueError("the card caught fire\nsecond line")

    def working(run):
        run.report.add("sampling", "fp32", "fine")

    assert gpu_report.run_stage(run, "benchmark", broken) is True  # True: go on
    assert gpu_report.run_stage(run, "sampling", working) is True
    saved = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert saved["benchmark"]["status"] == "failed"
    assert saved["benchmark"]["error"] == "ValueError: the card caught fire"
    assert saved["benchmark"]["rows"][0]["result"] == "half a result"  # kept
    assert saved["sampling"]["status"] == "ok"
    text = (tmp_path / "report.md").read_text()
    assert "| training speed | (benchmark) | FAILED:" in text and "| sampling | fp32 | fine |" in text
    assert "| time to quality | (time_to_quality) | not run |" in text


def test_a_stop_signal_ends_the_run_after_recording_it(tmp_path):
    report = gpu_report.Report(tmp_path, {"dry_run": True, "device_name": "CPU", "torch": "x",
                                          "commit": "c", "date": "d", "command": "c",
                                          "budget_s": 10, "model": "m"})
    run = gpu_report.Run(gpu_report.DRY, report, tmp_path, tmp_path / "work", tmp_path)

    def stopped(run):
        raise gpu_report.Stopped("SIGTERM")

    assert gpu_report.run_stage(run, "time_to_quality", stopped) is False  # False: stop
    saved = json.loads((tmp_path / "report.json").read_text())["stages"]["time_to_quality"]
    assert saved["status"] == "interrupted" and "SIGTERM" in saved["error"]
