"""The few-step timestep search (scripts/tune_steps.py): its candidates lie between the
neighbours, the coordinate descent finds a known optimum, and its result is a checkpoint
copy that generate.py samples with the found timesteps and no flag."""
from __future__ import annotations

import json

import pytest
import torch

import generate
from config import Config, ConfigError
from helpers import expect_one_line
from models import samplers
from sampling import pretrained
from sampling.api import load_model
from sampling.settings import resolve
from scripts import tune_steps
from utils.noise_scheduler import NoiseScheduler

LOG_SNR = torch.log(NoiseScheduler(1000).snr.double())


def test_candidates_lie_strictly_between_the_neighbours():
    assert tune_steps.candidates(LOG_SNR, 999, 500, 4) == sorted(
        tune_steps.candidates(LOG_SNR, 999, 500, 4), reverse=True)
    inner = tune_steps.candidates(LOG_SNR, 999, 500, 4)
    assert len(inner) == 4 and all(500 < t < 999 for t in inner)
    last = tune_steps.candidates(LOG_SNR, 300, -1, 4)  # towards the clean data: 0 included
    assert last[-1] == 0 and all(0 <= t < 300 for t in last)
    assert tune_steps.candidates(LOG_SNR, 5, 4, 4) == []


def test_search_finds_a_known_optimum_scoring_each_schedule_once():
    best = (999, 600, 250, 40)
    calls = []

    def score(timesteps):
        return sum((a - b) ** 2 for a, b in zip(timesteps, best)) / 1e3

    def counted(timesteps):
        calls.append(timesteps)
        return score(timesteps)

    start = samplers.timestep_sequence(1000, 4, "trailing")
    found, value, tried = tune_steps.search(counted, start, LOG_SNR, sweeps=4, count=8,
                                            log=lambda *a: None)
    assert found[0] == 999 and all(a > b >= 0 for a, b in zip(found, found[1:]))
    assert value == score(tuple(found)) < 0.05 * score(tuple(start))
    assert len(calls) == len(set(calls)) == len(tried)  # each schedule scored once
    assert tried[0] == {"timesteps": start, "fid": score(tuple(start))}


def test_tuned_timesteps_are_the_checkpoints_and_set_the_steps():
    config = Config(DEVICE="cpu", SPACING="tuned", TUNED_TIMESTEPS=(999, 500, 120),
                    SAMPLER="dpm-solver-3m", SAMPLING_STEPS=3)
    settings = resolve(config)
    assert settings.spacing == (999, 500, 120) and settings.steps == 3
    assert settings.label == "dpm-solver-3m-3-tuned"
    assert resolve(config, steps=3).spacing == (999, 500, 120)
    assert resolve(config, spacing="logsnr", steps=5).spacing == "logsnr"
    with pytest.raises(ConfigError, match="--steps 4: the tuned timesteps are 3"):
        resolve(config, steps=4)
    with pytest.raises(ConfigError, match="records no tuned timesteps"):
        resolve(Config(DEVICE="cpu"), spacing="tuned")
    with pytest.raises(ConfigError, match="not decreasing from 999"):
        Config(DEVICE="cpu", TUNED_TIMESTEPS=(999, 999, 3)).validate()


def test_generate_refuses_tuned_spacing_without_timesteps_in_one_line(capsys, tmp_path):
    line = expect_one_line(capsys, generate.main, [
        "--checkpoint", "pretrained", "--spacing", "tuned", "--output", tmp_path / "g.png",
        "--quiet", "--device", "cpu"])
    assert "records no tuned timesteps" in line and "scripts.tune_steps" in line


@pytest.mark.slow
def test_tune_steps_writes_a_checkpoint_that_samples_with_its_timesteps(
        tmp_path, monkeypatch, quick_evaluator, capsys):
    from evaluation import metrics

    monkeypatch.setattr(metrics, "Evaluator", lambda *a, **k: quick_evaluator)
    assert tune_steps.main(["--checkpoint", "pretrained", "--steps", "2", "--samples", "20",
                            "--sampler", "dpm-solver-3m", "--eta", "0", "--sweeps", "1",
                            "--candidates", "2", "--device", "cpu", "--output-dir",
                            str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "tune_steps_mnist_cpu_pretrained_dpm-solver-3m-2.json")
                        .read_text())
    # logsnr spacing at 2 steps ends at t = 0 (the second evaluation wasted): any other is better
    assert report["start"]["timesteps"] == [999, 0]
    assert report["best"]["fid"] == min(r["fid"] for r in report["tried"]) < report["start"]["fid"]
    copy = tmp_path / "mnist_cpu_pretrained_tuned2.pt"
    model = load_model(copy, "cpu")
    assert model.config.SPACING == "tuned"
    assert list(model.config.TUNED_TIMESTEPS) == report["best"]["timesteps"]
    shipped = load_model(pretrained.resolve("pretrained"), "cpu")
    for name, value in shipped.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert f"next: python generate.py --checkpoint {copy} --evaluate" in out
    assert generate.main(["--checkpoint", str(copy), "--num-samples", "10", "--quiet",
                          "--output", str(tmp_path / "g.png"), "--device", "cpu"]) == 0
    assert "sampling with dpm-solver-3m-2-tuned" in capsys.readouterr().out
