"""scripts/speed.py: its dry run measures the variants asked for, each checked against
eager's images, so the benchmark cannot rot (the real measurement takes minutes)."""
from __future__ import annotations

import json

import pytest

import helpers

VARIANTS = ("eager", "inference-mode", "channels-last")


@pytest.mark.slow
def test_dry_run_measures_every_variant(tmp_path):
    out = tmp_path / "speed.json"
    done = helpers.run_script("scripts.speed", "--dry-run", "--threads", "1", "--out", out,
                              "--variants", ",".join(VARIANTS), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == set(VARIANTS)
    tolerance = report["settings"]["tolerance"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row)
        assert row["images_per_s_best"] > 0 and row["images_per_s_median"] > 0, name
        assert 0 <= row["max_diff"] <= tolerance, (name, row["max_diff"])
        assert row["unet_max_diff"] <= report["settings"]["unet_tolerance"], name
    assert rows["eager"]["max_diff"] == 0
    assert "| channels-last | 4 |" in done.stdout  # the Markdown table
