"""Training that knows its budget: learning-rate decay to the end of the budget (steps,
epochs or minutes, the last with a fake clock), the power EMA's averaging length, the
progress bar's share of the budget, and log-normal timesteps. (Exact resume mid-decay:
tests/test_training.py.)"""
import math

import numpy as np
import pytest
import torch

from helpers import quiet
from training.schedules import lr_decay, power_ema_gamma
from training.trainer import Trainer
from utils.noise_scheduler import EDM_P_MEAN, EDM_P_STD, NoiseScheduler


def _lrs(trainer, fake_seconds_per_step=None):
    """Train to the end; return the learning rate every step used."""
    seen, done = [], {"steps": 0}
    step = trainer.train_step

    def recording(*batch):
        out = step(*batch)
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        done["steps"] += 1
        return out

    trainer.train_step = recording
    if fake_seconds_per_step is not None:
        trainer.clock = lambda: done["steps"] * fake_seconds_per_step
    trainer.fit()
    return seen


@pytest.mark.parametrize("schedule", ["linear", "cosine", "wsd"])
def test_lr_reaches_its_floor_exactly_at_the_last_step(tiny, schedule):
    trainer = Trainer(tiny(MAX_STEPS=12, LR_SCHEDULE=schedule, LR_FLOOR=0.1, LR_WARMUP_STEPS=0),
                      progress=False, log=quiet)
    lrs = _lrs(trainer)
    assert len(lrs) == 12
    assert lrs[0] == pytest.approx(trainer.base_lr)
    assert lrs[-1] == pytest.approx(0.1 * trainer.base_lr)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises
    assert lrs[10] < trainer.base_lr


def test_an_epoch_budget_decays_over_its_epochs(tiny):
    trainer = Trainer(tiny(EPOCHS=2, LR_SCHEDULE="linear", LR_WARMUP_STEPS=0), progress=False,
                      log=quiet)
    lrs = _lrs(trainer)
    assert len(lrs) == 2 * trainer.steps_per_epoch == 8
    assert lrs[-1] == 0.0 and lrs[0] == pytest.approx(trainer.base_lr)
    assert lrs[3] == pytest.approx(trainer.base_lr * (1 - 3 / 7))


def test_a_time_budget_decays_by_the_clock_and_ends_at_the_floor(tiny):
    # 0.25 minutes at a fake 1.5 s a step: 10 steps, whatever the step budget says
    trainer = Trainer(tiny(MAX_STEPS=1000, MAX_MINUTES=0.25, LR_SCHEDULE="linear",
                           LR_FLOOR=0.05, LR_WARMUP_STEPS=0), progress=False, log=quiet)
    lrs = _lrs(trainer, fake_seconds_per_step=1.5)
    assert len(lrs) == 10 and trainer.timed_out
    assert lrs[0] == pytest.approx(trainer.base_lr)
    assert lrs[-1] == pytest.approx(trainer.base_lr * (0.05 + 0.95 * (1 - 9 * 1.5 / 15)))
    # a slower machine (3 s a step) gets through the same decay in half the steps
    slow = Trainer(tiny(MAX_STEPS=1000, MAX_MINUTES=0.25, LR_SCHEDULE="linear", LR_FLOOR=0.05,
                        LR_WARMUP_STEPS=0, CHECKPOINT_DIR=str(trainer.checkpoint_dir) + "-slow"),
                   progress=False, log=quiet)
    slow_lrs = _lrs(slow, fake_seconds_per_step=3.0)
    # (its 5th step's lr was set after the 4th, at 12 s, with 1.25 s kept for the final grid:
    # the estimate until the epoch's end measured the (fake, free) save)
    assert len(slow_lrs) == 5 and slow_lrs[-1] == pytest.approx(
        slow.base_lr * (0.05 + 0.95 * (1 - (12 + 4 * 5 * 3.0 / (3 * 16)) / 15)))


def test_a_time_budget_is_wall_time_saves_and_grids_included(tiny):
    """Saving and drawing at epoch ends count against --max-minutes, and the run keeps
    the time its final save will take: it ends within a step of its budget. Fake clock:
    1.5 s a step, 2 s a save (4 steps an epoch, 15 s budget)."""
    trainer = Trainer(tiny(MAX_STEPS=1000, MAX_MINUTES=0.25, LR_WARMUP_STEPS=0, EPOCHS=100),
                      progress=False, log=quiet)
    clock = {"steps": 0, "grids": 0}
    draw, step = trainer.save_samples, trainer.train_step

    def drawing(*args):
        clock["grids"] += 1
        return draw(*args)

    def stepping(*batch):
        clock["steps"] += 1
        return step(*batch)

    trainer.save_samples, trainer.train_step = drawing, stepping
    trainer.clock = lambda: 1.5 * clock["steps"] + 2.0 * clock["grids"]
    trainer.fit()
    assert trainer._reserve == 2.0  # measured at the first epoch end
    # 4 steps (6 s), a grid (2 s), 4 steps until 14 s + the 2 s kept; then the final grid
    assert clock["steps"] == 8 and clock["grids"] == 2  # the old count made 10 steps, 3 grids
    assert trainer.elapsed == 15.0 and trainer.clock() <= 15.0 + 1.5  # within a step


def test_grids_that_take_too_long_are_drawn_at_fewer_epoch_ends(tiny):
    lines = []
    trainer = Trainer(tiny(MAX_STEPS=16, EPOCHS=100), progress=False, log=lines.append)
    clock = {"steps": 0, "grids": 0}
    draw, step = trainer.save_samples, trainer.train_step
    trainer.save_samples = lambda *a: (clock.__setitem__("grids", clock["grids"] + 1), draw(*a))[1]
    trainer.train_step = lambda *b: (clock.__setitem__("steps", clock["steps"] + 1), step(*b))[1]
    trainer.clock = lambda: 1.5 * clock["steps"] + 5.0 * clock["grids"]  # a grid: 5 s
    trainer.fit()
    # epoch 1's grid took 5 of 11 s, over the tenth: epochs 2 and 3 skip theirs; the final one
    assert clock["grids"] == 2 and any("drawing them at fewer epoch ends" in l for l in lines)
    assert trainer.elapsed == 16 * 1.5 + 5.0  # the epoch-end grid counted, not the final one


def test_before_any_epoch_end_the_final_grid_is_estimated(tiny):
    # 320 images: 20 steps an epoch, none ends within the 10 steps of the budget
    trainer = Trainer(tiny(MAX_STEPS=1000, MAX_MINUTES=0.25, LR_SCHEDULE="linear", LR_FLOOR=0.05,
                           LR_WARMUP_STEPS=0, TRAIN_SIZE=320), progress=False, log=quiet)
    lrs = _lrs(trainer, fake_seconds_per_step=1.5)
    reserve = 4 * 5 * 1.5 / (3 * 16)  # 4 images of 5 steps, a sampling step a third of a training one
    assert trainer._reserve == pytest.approx(reserve) and len(lrs) == 10
    # the lr reaches its floor where the final save begins
    assert lrs[-1] == pytest.approx(trainer.base_lr * (0.05 + 0.95 * (1 - (9 * 1.5 + reserve) / 15)))


def test_without_a_decaying_schedule_the_lr_is_flat_after_warm_up(tiny):
    trainer = Trainer(tiny(MAX_STEPS=6, LR_WARMUP_STEPS=2), progress=False, log=quiet)
    lrs = _lrs(trainer)
    assert lrs[0] == pytest.approx(trainer.base_lr / 2) and set(lrs[1:]) == {trainer.base_lr}


def test_the_progress_bar_counts_toward_whichever_budget_ends_the_run(tiny):
    """A time budget drives the bar when it comes first, a step budget otherwise: the bar
    reaches 100% exactly when the run ends, never before."""
    trainer = Trainer(tiny(MAX_STEPS=1000, MAX_MINUTES=0.25), progress=False, log=quiet)
    done = {"steps": 0}
    step = trainer.train_step
    seen = []

    def counting(*batch):
        out = step(*batch)
        done["steps"] += 1
        seen.append(trainer.progress_fraction(done["steps"] * 1.5))
        return out

    trainer.train_step = counting
    trainer.clock = lambda: done["steps"] * 1.5  # 10 steps fill the 15 seconds
    trainer.fit()
    assert trainer.step == 10 and seen[-1] == 1.0 and seen[4] == pytest.approx(0.5)
    steps_only = Trainer(tiny(MAX_STEPS=8), progress=False, log=quiet)
    steps_only.fit()
    assert steps_only.progress_fraction(0.0) == 1.0


@pytest.mark.parametrize("std", [0.05, 0.1])
@pytest.mark.parametrize("steps", [1000, 20000])
def test_power_ema_averages_the_documented_share_of_the_run(tiny, std, steps):
    """Feed the EMA the step number itself: it then holds the mean age of what it
    averages; with the square, the spread. Both scale with the run, as documented."""
    trainer = Trainer(tiny(EMA_RULE="power", EMA_STD=std), progress=False, log=quiet)
    mean = mean_sq = 0.0
    for step in range(steps):
        beta = trainer.ema_decay_at(step)
        x = step + 1
        mean = beta * mean + (1 - beta) * x
        mean_sq = beta * mean_sq + (1 - beta) * x * x
    spread = math.sqrt(mean_sq - mean ** 2) / steps
    gamma = power_ema_gamma(std)
    assert spread == pytest.approx(std, rel=0.02)
    assert mean / steps == pytest.approx((gamma + 1) / (gamma + 2), rel=0.01)


def test_power_ema_gamma_matches_edm2():
    # EDM2 (Karras et al. 2024) uses sigma_rel 0.05 and 0.10 <-> gamma 16.97 and 6.94
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)


def test_lr_decay_shapes():
    assert [lr_decay("linear", f) for f in (0, 0.5, 1)] == [1.0, 0.5, 0.0]
    assert lr_decay("cosine", 0.5, 0.2) == pytest.approx(0.6)
    assert [lr_decay("wsd", f) for f in (0, 0.8, 0.9, 1)] == pytest.approx([1, 1, 0.5, 0])
    assert lr_decay("constant", 0.99) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_decay("step", 0.5)


def test_lognormal_timesteps_follow_edm_in_log_sigma():
    scheduler = NoiseScheduler(1000)
    generator = torch.Generator().manual_seed(0)
    t = scheduler.sample_timesteps(200_000, "cpu", generator, "lognormal")
    assert t.min() >= 0 and t.max() <= 999
    log_sigma = scheduler.log_sigmas[t].double().numpy()
    inside = (log_sigma > scheduler.log_sigmas[0].item() + 0.5) & \
             (log_sigma < scheduler.log_sigmas[-1].item() - 0.5)
    # away from the table's ends, the median and spread are EDM's (to the table's resolution)
    assert np.median(log_sigma) == pytest.approx(EDM_P_MEAN, abs=0.02)
    q16, q84 = np.quantile(log_sigma[inside], [0.16, 0.84])
    assert (q84 - q16) / 2 == pytest.approx(EDM_P_STD, rel=0.1)
    uniform = scheduler.sample_timesteps(200_000, "cpu", generator)
    assert abs(uniform.double().mean().item() - 499.5) < 3
    with pytest.raises(ValueError, match="unknown timestep distribution"):
        scheduler.sample_timesteps(4, "cpu", generator, "beta")
