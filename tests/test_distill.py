"""Distillation into a few-step student: the loss falls, a progressive student at k steps
matches its teacher's 2k steps closer than the undistilled model does, a consistency
student is more consistent along the teacher's trajectory, resume is exact, generate.py
samples a student with no flag, and the bad requests are one line."""
from __future__ import annotations

import pytest
import torch

import generate
import main
from config import Config, config_for_resume
from helpers import assert_same_weights, expect_one_line, quiet, stop_by_signal_after
from training.trainer import TrainingInterrupted
from models import samplers
from models.diffusion import DiffusionModel
from sampling import pretrained
from training.distill import Distiller, distillation_config
from utils import checkpoint as ckpt
from utils.seeding import PerSampleNoise


@pytest.fixture(scope="module")
def teacher():
    """The model that ships with the repo (a trained CPU preset: its few-step samplers are
    visibly off its many-step ones, which is what distillation mends)."""
    return pretrained.resolve("pretrained")


def _distil(teacher, tmp_path, stop_after: int = 0, **changes):
    requested = {**dict(MAX_STEPS=40, CHECKPOINT_DIR=str(tmp_path / "s"),
                        OUTPUT_DIR=str(tmp_path / "s"), TEACHER_STEPS=8, STUDENT_STEPS=4,
                        NUM_SAMPLES=10, PRINT_EVERY=5, TRAIN_SIZE=2048), **changes}
    config = distillation_config(teacher, requested)
    distiller = Distiller(config, progress=False, log=quiet)
    if stop_after:
        stop_by_signal_after(distiller, stop_after)
    distiller.fit()
    return distiller


def _ddim(model, steps: int, count: int = 16, seed: int = 5) -> torch.Tensor:
    noise = PerSampleNoise(seed, range(count), model.image_shape, "cpu")
    labels = torch.arange(count) % 10
    return samplers.sample_ddim(model.denoiser("fp32", labels), model.scheduler, noise.initial(),
                                steps, eta=0.0, prediction=model.prediction, spacing="trailing")


@pytest.mark.slow
def test_progressive_student_at_k_steps_matches_the_teachers_2k(teacher, tmp_path):
    distiller = _distil(teacher, tmp_path, MAX_STEPS=60)
    first, last = distiller.losses[:10], distiller.losses[-10:]
    assert sum(last) < sum(first)  # the distillation loss falls
    original, _ = DiffusionModel.from_checkpoint(teacher)
    target = _ddim(original, 8)  # the teacher's 2k = 8 steps (this run: 8 -> 4, one round)
    before = (_ddim(original, 4) - target).square().mean()
    after = (_ddim(distiller.ema, 4) - target).square().mean()
    assert after < before, (after, before)
    assert distiller.config.SAMPLER == "ddim" and distiller.config.SAMPLING_STEPS == 4


@pytest.mark.slow
def test_consistency_student_maps_the_teachers_path_closer_to_its_end(teacher, tmp_path):
    """A consistency model maps every point x_t of the teacher's ODE path to the path's
    end (Song et al. 2023): after distillation its x0 prediction at each point of an
    8-point DDIM path is closer to where the teacher's path ends than the teacher's own."""
    distiller = _distil(teacher, tmp_path, DISTILL_METHOD="consistency", STUDENT_STEPS=2,
                        TEACHER_STEPS=8, MAX_STEPS=60)
    original, _ = DiffusionModel.from_checkpoint(teacher)
    grid = samplers.timestep_sequence(original.timesteps, 8, "trailing")
    labels = torch.arange(16) % 10
    path = [PerSampleNoise(7, range(16), original.image_shape, "cpu").initial()]
    for t, t_next in zip(grid, grid[1:] + [-1]):
        path.append(_teacher_step(original, path[-1], t, t_next, labels))

    def error_to_the_end(model) -> float:
        total = 0.0
        for x, t in zip(path, grid):
            tt = torch.full((16,), t)
            x0 = model.scheduler.split_model_output(x, tt, model.denoiser("fp32", labels)(x, tt),
                                                    model.prediction, False)[0]
            total += (x0 - path[-1]).square().mean().item()
        return total / len(grid)

    assert error_to_the_end(distiller.ema) < 0.9 * error_to_the_end(original)
    assert distiller.config.SAMPLER == "consistency"


def _teacher_step(model, x, t: int, t_next: int, labels) -> torch.Tensor:
    x0, eps = samplers.predict(model.denoiser("fp32", labels), model.scheduler, x, t,
                               model.prediction, model.clip_x0)
    return samplers.ddim_step(model.scheduler, x, t, t_next, x0, eps, 0.0, None)


@pytest.mark.parametrize("method", ["progressive", "consistency"])
def test_distillation_resumes_exactly(teacher, tmp_path, method):
    """Across a round's end too (progressive 8 -> 2: two rounds of 6 steps)."""
    settings = dict(DISTILL_METHOD=method, TEACHER_STEPS=8, STUDENT_STEPS=2, PRINT_EVERY=1,
                    SAVE_EVERY=1000)
    straight = _distil(teacher, tmp_path / "a", MAX_STEPS=12, **settings)
    with pytest.raises(TrainingInterrupted):  # Ctrl-C during step 5
        _distil(teacher, tmp_path / "b", MAX_STEPS=12, stop_after=5, **settings)
    state = ckpt.load_checkpoint(tmp_path / "b" / "s" / ckpt.LATEST)
    assert state["step"] == 5
    config = config_for_resume(Config.from_dict(state["config"]), {"MAX_STEPS": 12})
    resumed = Distiller(config, resume=state, progress=False, log=quiet)
    resumed.fit()
    assert resumed.losses == straight.losses
    assert_same_weights(straight, resumed)
    assert resumed.round == straight.round == (1 if method == "progressive" else 0)


def test_generate_samples_a_student_with_its_own_settings(teacher, tmp_path, capsys):
    student = _distil(teacher, tmp_path, MAX_STEPS=3).checkpoint_dir / ckpt.LATEST
    assert generate.main(["--checkpoint", str(student), "--num-samples", "10", "--quiet",
                          "--output", str(tmp_path / "g.png")]) == 0
    assert "sampling with ddim-4-trailing" in capsys.readouterr().out


def test_main_distils_from_the_command_line(teacher, tmp_path, capsys):
    assert main.main(["--distill", str(teacher), "--student-steps", "4", "--teacher-steps", "8",
                      "--max-steps", "4", "--quiet", "--checkpoint-dir", str(tmp_path / "d"),
                      "--no-download", "--train-size", "256", "--num-samples", "10"]) == 0
    out = capsys.readouterr().out
    assert "distilling" in out and "plan:" in out
    config = ckpt.load_checkpoint(tmp_path / "d" / ckpt.LATEST)["config"]
    assert config["DISTILL"] == str(teacher) and config["SAMPLING_STEPS"] == 4


def test_bad_distillation_requests_are_one_line(teacher, tmp_path, capsys):
    student = _distil(teacher, tmp_path, MAX_STEPS=2).checkpoint_dir / ckpt.LATEST
    cases = [
        (["--distill", str(student)], "is itself a distilled student"),
        (["--distill", str(tmp_path / "nope.pt")], "does not exist"),
        (["--distill", str(teacher), "--student-steps", "3", "--teacher-steps", "8"],
         "must be --student-steps (3) times a power of 2"),
        (["--distill", str(teacher), "--model-channels", "32"], "differs from the teacher's"),
        (["--distill", str(teacher), "--student-steps", "16", "--teacher-steps", "8"],
         "need 1 <= student <= teacher"),
    ]
    for argv, message in cases:
        line = expect_one_line(capsys, main.main, [*argv, "--quiet", "--checkpoint-dir",
                                                   str(tmp_path / "x")])
        assert message in line, line
