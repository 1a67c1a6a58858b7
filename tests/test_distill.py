"""Distillation into a few-step student: the loss falls, a progressive student at k steps
matches its teacher's 2k steps closer than the undistilled model does, a consistency
student is more consistent along the teacher's trajectory, ect's pairs close in on one
timestep over its stages, the later progressive rounds train longer, a guided teacher's
guidance is applied once, resume is exact, generate.py samples a student with no flag
(an older student on the grid it was trained on), and the bad requests are one line."""
from __future__ import annotations

import math

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
from sampling.settings import resolve
from training.distill import (DEFAULT_MATCHING, ECT_P_MEAN, ECT_P_STD, ECT_STAGES, Distiller, distillation_config,
                              ect_partner, progressive_rounds, round_starts)
from utils import checkpoint as ckpt
from utils.noise_scheduler import NoiseScheduler
from utils.seeding import PerSampleNoise


@pytest.fixture(scope="module")
def teacher():
    """The model that ships with the repo (a trained CPU preset: its few-step samplers are
    visibly off its many-step ones, which is what distillation mends)."""
    return pretrained.resolve("pretrained")


def _teacher_copy(teacher, path, **changes):
    """The shipped teacher with other settings in its config (weights unchanged)."""
    state = ckpt.load_checkpoint(teacher)
    ckpt.save_checkpoint({**state, "config": {**state["config"], **changes}}, path)
    return path


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
    # the regression alone (distribution matching trades the teacher's path for the data's
    # distribution: tested apart)
    distiller = _distil(teacher, tmp_path, MAX_STEPS=60, DISTRIBUTION_MATCHING=0.0)
    first, last = distiller.losses[:10], distiller.losses[-10:]
    assert sum(last) < sum(first)  # the distillation loss falls
    original, _ = DiffusionModel.from_checkpoint(teacher)
    target = _ddim(original, 8)  # the teacher's 2k = 8 steps (this run: 8 -> 4, one round)
    before = (_ddim(original, 4) - target).square().mean()
    after = (_ddim(distiller.ema, 4) - target).square().mean()
    assert after < before, (after, before)
    assert distiller.config.SAMPLER == "ddim" and distiller.config.SAMPLING_STEPS == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["consistency", "ect"])
def test_consistency_student_maps_the_teachers_path_closer_to_its_end(teacher, tmp_path, method):
    """A consistency model maps every point x_t of the teacher's ODE path to the path's
    end (Song et al. 2023): after distillation its x0 prediction at each point of an
    8-point DDIM path is closer to where the teacher's path ends than the teacher's own.
    ect learns it from the data's ODE, which the teacher's path follows."""
    distiller = _distil(teacher, tmp_path, DISTILL_METHOD=method, STUDENT_STEPS=2,
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


@pytest.mark.parametrize("method", ["progressive", "consistency", "matching",
                                    pytest.param("ect", marks=pytest.mark.slow)])
def test_distillation_resumes_exactly(teacher, tmp_path, method):
    """Across a round's end too (progressive 8 -> 2: two rounds, the second from step 4,
    a third of the budget in), and across ect's stages (a function of the budget used).
    With distribution matching (in the second round) the fake score and its optimizer
    resume too, and the teacher's score stays the original teacher's."""
    matching = method == "matching"
    method = "progressive" if matching else method
    settings = dict(DISTILL_METHOD=method, TEACHER_STEPS=8, STUDENT_STEPS=2, PRINT_EVERY=1,
                    SAVE_EVERY=1000, DISTILL_ROUNDS=2 if method == "progressive" else 0,
                    **({"DISTRIBUTION_MATCHING": 1.0 if matching else 0.0}
                       if method == "progressive" else {}))
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
    if matching:
        original = ckpt.load_checkpoint(teacher)["ema"]
        for name, value in original.items():
            assert torch.equal(resumed.score.state_dict()[name], value), name
        assert_same_weights({"model": straight.fake.state_dict(), "ema": {}},
                            {"model": resumed.fake.state_dict(), "ema": {}})
        assert any(not torch.equal(resumed.fake.state_dict()[name], value)
                   for name, value in original.items())  # the fake score learned
    assert resumed.round == straight.round == (1 if method == "progressive" else 0)
    # the round ended where a third of the budget was used: fraction 4/11 after 4 steps
    assert straight.round_start == (4 if method == "progressive" else 0)


def test_distribution_matching_steps_towards_the_teacher_away_from_the_fake(teacher, tmp_path,
                                                                              monkeypatch):
    """DMD's step on the student's images x: noised to tau, the teacher's x0 ("real") and
    the fake score's ("fake") set the direction fake - real, scaled by mean|x - real|; a
    descent step on the loss moves x towards real and away from fake, by that gradient."""
    config = distillation_config(teacher, dict(
        DISTRIBUTION_MATCHING=1.0, MAX_STEPS=1, PRECISION="fp32",
        CHECKPOINT_DIR=str(tmp_path / "s"), OUTPUT_DIR=str(tmp_path / "s")))
    distiller = Distiller(config, progress=False, log=quiet)
    assert distiller.matching()  # one round: the last
    shape = (3, *distiller.model.image_shape)
    real, fake = torch.full(shape, 0.5), torch.full(shape, -0.25)
    monkeypatch.setattr(distiller, "_predict", lambda model, *args: (
        real if model is distiller.score else fake, None))
    monkeypatch.setattr(distiller, "_train_fake", lambda *args: None)
    draws = distiller._matching_draws(shape, slice(0, 3))
    x = torch.zeros(shape, requires_grad=True)
    loss = distiller._matching_loss(x, torch.arange(3), draws)
    loss.sum().backward()
    pixels = x[0].numel()
    # grad = (fake - real) / mean|x - real| = -0.75 / 0.5 = -1.5 per pixel: x - grad = 1.5
    assert torch.allclose(x.grad, torch.full(shape, -1.5 / pixels))
    assert torch.allclose(loss, torch.full((3,), 0.5 * 1.5 ** 2))
    # the same images where the fake score agrees with the teacher: nothing to move
    monkeypatch.setattr(distiller, "_predict", lambda model, *args: (real, None))
    x.grad = None
    distiller._matching_loss(x, torch.arange(3), draws).sum().backward()
    assert torch.equal(x.grad, torch.zeros(shape))


def test_progressive_distillation_matches_distributions_by_default(teacher):
    """--distribution-matching defaults to DEFAULT_MATCHING for progressive distillation (what
    measured best), 0 for the methods it is not part of; a student records its weight."""
    assert distillation_config(teacher, {}).DISTRIBUTION_MATCHING == DEFAULT_MATCHING > 0
    assert distillation_config(teacher, {"DISTILL_METHOD": "ect"}).DISTRIBUTION_MATCHING == 0
    off = distillation_config(teacher, {"DISTRIBUTION_MATCHING": 0.0})
    assert off.DISTRIBUTION_MATCHING == 0
    assert Config.from_dict({**off.to_dict(), "DISTRIBUTION_MATCHING": 2.0}).DISTRIBUTION_MATCHING == 2


def test_distribution_matching_starts_from_the_students_own_chain(teacher, tmp_path):
    """DMD2's backward simulation: the images matched are the student's own last step,
    from x at its last timestep reached by its EMA's DDIM steps from pure noise, as it
    samples (4 steps: 999, 749, 499, then 249 is the last)."""
    config = distillation_config(teacher, dict(
        DISTRIBUTION_MATCHING=1.0, MAX_STEPS=1, PRECISION="fp32", STUDENT_STEPS=4,
        CHECKPOINT_DIR=str(tmp_path / "s"), OUTPUT_DIR=str(tmp_path / "s")))
    distiller = Distiller(config, progress=False, log=quiet)
    model, labels = distiller.ema, torch.arange(5)
    x = PerSampleNoise(4, range(5), model.image_shape, "cpu").initial()
    ours, t_last = distiller._own_chain(x, labels)
    assert t_last.tolist() == [249] * 5
    theirs = x
    for t, t_next in ((999, 749), (749, 499), (499, 249)):
        theirs = _teacher_step(model, theirs, t, t_next, labels)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("solver", ["ddim", "dpm-solver"])
def test_a_round_teaches_the_teachers_own_sampler(teacher, tmp_path, solver):
    """One round from 16 steps to 1 (--distill-rounds 1): the student's target is where the
    teacher's own sampler lands over the whole 16-step trailing grid, DDIM or (with
    --teacher-solver dpm-solver) DPM-Solver++(2M), per image as in the sampler."""
    config = distillation_config(teacher, dict(
        TEACHER_STEPS=16, STUDENT_STEPS=1, DISTILL_ROUNDS=1, TEACHER_SOLVER=solver,
        PRECISION="fp32",  # the path's arithmetic, compared in fp32 on any CPU
        MAX_STEPS=1, CHECKPOINT_DIR=str(tmp_path / "s"), OUTPUT_DIR=str(tmp_path / "s")))
    distiller = Distiller(config, progress=False, log=quiet)
    assert (distiller.rounds, distiller.factor, distiller.student_steps()) == (1, 16, 1)
    model = distiller.teacher
    labels = torch.arange(6) % 10
    x = PerSampleNoise(3, range(6), model.image_shape, "cpu").initial()
    grid = samplers.timestep_sequence(model.timesteps, 16, "trailing") + [-1]
    path = [torch.full((6,), t) for t in grid]
    with torch.no_grad():
        ours = distiller._teacher_path(x, path, labels)
    denoiser = model.denoiser("fp32", labels)
    sampler = (samplers.sample_ddim if solver == "ddim" else samplers.sample_dpm_solver)
    theirs = sampler(denoiser, model.scheduler, x, 16, prediction=model.prediction,
                     clip_x0=model.clip_x0, spacing="trailing")
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    if solver == "dpm-solver":  # and it is not DDIM's path
        ddim = samplers.sample_ddim(denoiser, model.scheduler, x, 16, prediction=model.prediction,
                                    clip_x0=model.clip_x0, spacing="trailing")
        assert (ours - ddim).abs().max() > 1e-2


def test_rounds_divide_the_steps_equally():
    """--distill-rounds R splits the halvings from teacher to student steps into R rounds."""
    def rounds(**settings):
        return progressive_rounds(Config(DISTILL="x", **settings).validate())
    assert rounds(TEACHER_STEPS=16, STUDENT_STEPS=4, DISTILL_ROUNDS=2) == (2, 2)  # 16 -> 8 -> 4
    assert rounds(TEACHER_STEPS=16, STUDENT_STEPS=1, DISTILL_ROUNDS=1) == (1, 16)  # 16 -> 1
    # by default the fewest rounds of at most 4 teacher steps per student step
    assert rounds(TEACHER_STEPS=16, STUDENT_STEPS=4) == (1, 4)  # 16 -> 4
    assert rounds(TEACHER_STEPS=16, STUDENT_STEPS=2) == (3, 2)  # 16 -> 8 -> 4 -> 2
    assert rounds(TEACHER_STEPS=16, STUDENT_STEPS=1) == (2, 4)  # 16 -> 4 -> 1
    assert rounds(TEACHER_STEPS=64, STUDENT_STEPS=1) == (3, 4)  # 64 -> 16 -> 4 -> 1
    assert rounds(DISTILL_METHOD="ect", STUDENT_STEPS=2) == (1, 1)


def test_later_rounds_get_more_of_the_budget():
    """Round k of R gets k / (1 + ... + R): 64 -> 4 in four rounds of 10, 20, 30, 40%."""
    assert round_starts(4) == pytest.approx([0.0, 0.1, 0.3, 0.6])
    assert round_starts(1) == [0.0]
    starts = round_starts(6) + [1.0]
    shares = [b - a for a, b in zip(starts, starts[1:])]
    assert all(a < b for a, b in zip(shares, shares[1:])) and shares[-1] == pytest.approx(6 / 21)


def test_the_lr_schedule_runs_once_per_round(teacher, tmp_path):
    """8 -> 4 -> 2: rounds of a third and two thirds of the budget; a linear schedule decays
    to 0 at the end of each (Salimans & Ho), and a constant one stays at the peak."""
    config = distillation_config(teacher, dict(TEACHER_STEPS=8, STUDENT_STEPS=2, MAX_STEPS=30,
                                               DISTILL_ROUNDS=2, LR_SCHEDULE="linear",
                                               CHECKPOINT_DIR=str(tmp_path)))
    distiller = Distiller(config, progress=False, log=quiet)
    peak = distiller.base_lr
    lrs = [distiller.lr_at(100, f) / peak for f in (0.0, 1 / 6, 1 / 3 - 1e-9, 1 / 3, 2 / 3, 1.0)]
    assert lrs == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.5, 0.0], abs=1e-6)
    ect = Distiller(config.replace(DISTILL_METHOD="ect"), progress=False, log=quiet)
    assert ect.lr_at(100, 0.5) / peak == pytest.approx(0.5)  # one schedule over the budget
    constant = Distiller(config.replace(LR_SCHEDULE="constant"), progress=False, log=quiet)
    assert constant.lr_at(100, 0.9) == pytest.approx(peak)


def test_ect_pairs_close_in_on_one_timestep_over_the_stages():
    """Geng et al.'s mapping on this grid: r < t always (-1 is the clean data); stage 0
    pairs most noise levels with the clean data, each stage halves the gap, and the last
    one pairs most t with a timestep or two below."""
    scheduler = NoiseScheduler(1000)
    t = scheduler.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0), "lognormal",
                                   ECT_P_MEAN, ECT_P_STD)
    gaps, clean = [], []
    for stage in range(ECT_STAGES):
        r = ect_partner(scheduler, t, stage)
        assert (r < t).all() and (r >= -1).all()
        gaps.append((t - r).float().median().item())
        clean.append((r < 0).float().mean().item())
    assert clean[0] > 0.7 and clean[-1] < 0.05  # (t = 0 itself pairs with the clean data)
    assert all(a > b for a, b in zip(gaps[:-2], gaps[1:-1])) and gaps[-1] <= gaps[-2]
    assert gaps[0] > 50 and gaps[-1] == 1
    # stage 0 at the top: sigma_r = sigma_t (1 - n(sigma_t) / 2), n = 1 + 8 sigmoid(-sigma_t)
    sigmas = scheduler.log_sigmas.exp()
    s_t = sigmas[999].item()
    expected = s_t * (1 - (1 + 8 / (1 + math.exp(s_t))) / 2)
    r = ect_partner(scheduler, torch.tensor([999]), 0).item()
    assert sigmas[r] <= expected < sigmas[r + 1]


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


def test_the_shipped_model_is_a_teacher_by_name(teacher):
    config = distillation_config("pretrained", dict(STUDENT_STEPS=4, MAX_STEPS=10))
    assert config.DISTILL == str(teacher) and config.STUDENT_STEPS == 4


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
        (["--distill", str(teacher), "--student-steps", "8", "--teacher-steps", "8"],
         "must be --student-steps (8) times a power of 2"),
        (["--distill", str(teacher), "--student-steps", "16"],  # the default teacher: 16 steps
         "--teacher-steps (16) must be --student-steps (16) times a power of 2 (2, 4, 8, ...), "
         "e.g. --teacher-steps 32"),
        (["--distill", str(teacher), "--student-steps", "0"], "--student-steps (0)"),
        (["--distill", str(teacher), "--student-steps", "1001"], "--student-steps (1001)"),
        (["--distill", str(teacher), "--student-steps", "1000"], "--student-steps (1000)"),
        (["--distill", str(teacher), "--distill-method", "ect", "--student-steps", "1001"],
         "--student-steps (1001) must lie in 1 .. --timesteps (1000)"),
        (["--distill", str(teacher), "--distill-method", "ect", "--guidance", "2"],
         "ect trains on the data"),
        (["--distill", str(teacher), "--teacher-steps", "64", "--distill-rounds", "3"],
         "--distill-rounds 3: from --teacher-steps 64 to --student-steps 4 the steps halve 4 "
         "time(s), which every round must share equally: give 1, 2, 4 (or 0"),
        (["--distill", str(teacher), "--distill-method", "ect", "--teacher-solver", "ddim"],
         "--teacher-solver ddim is a setting of progressive distillation"),
        (["--distill", str(teacher), "--distill-method", "consistency",
          "--distribution-matching", "1"],
         "--distribution-matching 1.0 is a setting of progressive distillation"),
        (["--distill", str(teacher), "--distribution-matching", "-1"],
         "--distribution-matching -1.0 must be a weight >= 0"),
    ]
    for argv, message in cases:
        line = expect_one_line(capsys, main.main, [*argv, "--quiet", "--checkpoint-dir",
                                                   str(tmp_path / "x")])
        assert message in line, line


def test_a_guided_teacher_is_guided_once(teacher, tmp_path):
    """Its guidance W is baked into the first round's targets: the student records it and
    samples at guidance 1, and a later round's teacher (an earlier student) is not guided
    again."""
    guided = _teacher_copy(teacher, tmp_path / "guided.pt", GUIDANCE=3.0)
    config = distillation_config(guided, dict(MAX_STEPS=4, TEACHER_STEPS=8, STUDENT_STEPS=2,
                                              DISTILL_ROUNDS=2))
    assert (config.GUIDANCE, config.TEACHER_GUIDANCE) == (1.0, 3.0)
    asked = distillation_config(teacher, dict(MAX_STEPS=4, GUIDANCE=2.0))
    assert (asked.GUIDANCE, asked.TEACHER_GUIDANCE) == (1.0, 2.0)
    assert resolve(config).guidance == 1.0

    scales = []
    distiller = Distiller(config.replace(CHECKPOINT_DIR=str(tmp_path / "s"), OUTPUT_DIR=str(
        tmp_path / "s"), NUM_SAMPLES=10, TRAIN_SIZE=256), progress=False, log=quiet)
    denoiser = distiller.teacher.denoiser

    def spy(precision, labels, guidance=1.0, *args):
        scales.append((distiller.round, guidance))
        return denoiser(precision, labels, guidance, *args)

    distiller.teacher.denoiser = spy
    assert "guidance 3 is baked into the targets" in distiller.plan()
    distiller.fit()
    assert {w for r, w in scales if r == 0} == {3.0} and {w for r, w in scales if r == 1} == {1.0}


def test_an_older_student_samples_as_it_was_trained():
    """A student saved before TEACHER_GUIDANCE was recorded trained on the trailing grid
    of that time, and its GUIDANCE was baked in: it reads as trailing-v1 and guidance 1."""
    old = {**Config(DEVICE="cpu").to_dict(), "DISTILL": "runs/T/latest.pt", "SAMPLER": "ddim",
           "SPACING": "trailing", "SAMPLING_STEPS": 4, "GUIDANCE": 2.0}
    del old["TEACHER_GUIDANCE"]
    config = Config.from_dict(old)
    assert (config.SPACING, config.GUIDANCE, config.TEACHER_GUIDANCE) == ("trailing-v1", 1.0, 2.0)
    settings = resolve(config)
    assert samplers.timestep_sequence(1000, 4, settings.spacing) == [999, 749, 500, 250]
    new = Config.from_dict(config.replace(SPACING="trailing").to_dict())
    assert new.SPACING == "trailing" and new.TEACHER_GUIDANCE == 2.0


def test_an_older_distillation_resumes_as_it_began():
    """A run saved before --distill-rounds and --teacher-solver were settings halved the
    steps in each round along DDIM's path: so it reads (16 -> 8 -> 4, DDIM), while a new
    run by default copies 4 teacher steps per student step along DPM-Solver++(2M)'s."""
    old = {**Config(DEVICE="cpu").to_dict(), "DISTILL": "runs/T/latest.pt",
           "TEACHER_STEPS": 16, "STUDENT_STEPS": 4}
    del old["DISTILL_ROUNDS"], old["TEACHER_SOLVER"]
    config = Config.from_dict(old)
    assert (config.DISTILL_ROUNDS, config.TEACHER_SOLVER) == (2, "ddim")
    assert progressive_rounds(config) == (2, 2)
    new = Config.from_dict(Config(DEVICE="cpu", DISTILL="runs/T/latest.pt").to_dict())
    assert (progressive_rounds(new), new.TEACHER_SOLVER) == ((1, 4), "dpm-solver")


def test_an_eps_teacher_is_refused_in_one_line(teacher, tmp_path, capsys):
    eps = _teacher_copy(teacher, tmp_path / "eps.pt", PREDICTION="eps")
    line = expect_one_line(capsys, main.main, ["--distill", eps, "--quiet", "--checkpoint-dir",
                                               tmp_path / "x"])
    assert "--prediction eps" in line and "--prediction v" in line and "157" in line, line


def test_a_rounds_student_given_to_resume_says_what_to_do(teacher, tmp_path, capsys):
    run = _distil(teacher, tmp_path, MAX_STEPS=3, TEACHER_STEPS=8, STUDENT_STEPS=2,
                  DISTILL_ROUNDS=2)
    student = run.checkpoint_dir / "student_4steps.pt"
    line = expect_one_line(capsys, main.main, ["--resume", student, "--quiet"])
    assert "student of one round" in line and str(run.checkpoint_dir / ckpt.LATEST) in line
    assert "generate.py --checkpoint" in line and "optimizer'" not in line, line
