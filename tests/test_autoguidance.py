"""Autoguidance (Karras et al. 2024): the guided output's formula, with and without
classifier-free guidance, the guidance interval, the guide a run keeps, and the command line."""
from __future__ import annotations

import pytest
import torch

import generate
from helpers import expect_one_line, train
from models.diffusion import DiffusionModel
from sampling.api import generate_images, load_model
from utils import checkpoint as ckpt


def tiny_model(seed: int, **kwargs) -> DiffusionModel:
    torch.manual_seed(seed)
    model = DiffusionModel(timesteps=50, model_channels=8, time_embed_dim=16, num_res_blocks=1,
                           **kwargs).eval()
    for p in model.parameters():  # random weights everywhere: the zero-initialised convolutions too
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_autoguidance_moves_away_from_the_guide():
    model, guide = tiny_model(0), tiny_model(1)
    x, t = torch.randn(3, 1, 28, 28), torch.full((3,), 30)
    with torch.no_grad():
        main, weak = model.network(x, t), guide.network(x, t)
        for a in (0.0, 1.0, 2.5):
            out = model.denoiser(guide=guide, autoguidance=a)(x, t)
            torch.testing.assert_close(out, weak + a * (main - weak), rtol=1e-5, atol=1e-5)
    assert not torch.equal(main, weak)


def test_autoguidance_with_classifier_free_guidance():
    model, guide = tiny_model(0, num_classes=10), tiny_model(1, num_classes=10)
    x, t, y = torch.randn(4, 1, 28, 28), torch.full((4,), 20), torch.tensor([1, 2, 3, 4])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        out_c, out_u, guide_c = model.network(x, t, y), model.network(x, t, null), guide.network(x, t, y)
        out = model.denoiser(labels=y, guidance=3.0, guide=guide, autoguidance=2.0)(x, t)
        expected = out_c + 2.0 * (out_c - out_u) + 1.0 * (out_c - guide_c)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # W = 0 draws without classes: the guide is asked without classes too
        out = model.denoiser(labels=y, guidance=0.0, guide=guide, autoguidance=2.0)(x, t)
        torch.testing.assert_close(out, 2 * out_u - guide.network(x, t, null), rtol=1e-5, atol=1e-5)


def test_guidance_interval_guides_only_inside():
    model, guide = tiny_model(0), tiny_model(1)
    sigmas = model.scheduler.log_sigmas.exp()
    low, high = float(sigmas[10]), float(sigmas[30])  # guided for t = 11 .. 30
    denoise = model.denoiser(guide=guide, autoguidance=3.0, interval=(low, high))
    full = model.denoiser(guide=guide, autoguidance=3.0)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for t, inside in ((5, False), (10, False), (11, True), (30, True), (31, False), (49, False)):
            tt = torch.full((2,), t)
            expected = full(x, tt) if inside else model.network(x, tt)
            torch.testing.assert_close(denoise(x, tt), expected, msg=str(t))
        mixed = torch.tensor([5, 20])  # a batch across the edge: each image by its own level
        out = denoise(x, mixed)
        torch.testing.assert_close(out[0], model.network(x, mixed)[0])
        torch.testing.assert_close(out[1], full(x, mixed)[1])


def test_a_guide_must_fit_the_model():
    model = tiny_model(0)
    with pytest.raises(ValueError, match="needs a guide"):
        model.denoiser(autoguidance=2.0)
    for other in (tiny_model(1, prediction="v"),
                  DiffusionModel(timesteps=40, model_channels=8, time_embed_dim=16)):
        with pytest.raises(ValueError, match="does not fit"):
            model.set_guide(other)
    smaller = DiffusionModel(timesteps=50, model_channels=4, time_embed_dim=8, num_res_blocks=1)
    assert model.set_guide(smaller).guide is smaller  # a smaller model of the same schedule
    assert "_guide" not in dict(model.named_modules()) and \
        not any(k.startswith("_guide") for k in model.state_dict())


def test_a_run_keeps_its_guide_at_the_fraction_asked(tiny, monkeypatch):
    kept = {}
    from training.trainer import Trainer

    original = Trainer.keep_guide

    def spy(self):
        kept["step"], kept["ema"] = self.step, {k: v.clone() for k, v in self.ema.state_dict().items()}
        original(self)

    monkeypatch.setattr(Trainer, "keep_guide", spy)
    config = tiny(MAX_STEPS=8, GUIDE_AT=0.5, AUTOGUIDANCE=2.0)
    trainer = train(config)
    assert trainer.guide_step == kept["step"] == 4  # the first step with step / 7 >= 0.5
    state = ckpt.load_checkpoint(trainer.checkpoint_dir / ckpt.LATEST)
    assert state["guide_step"] == 4
    for name, value in kept["ema"].items():
        assert torch.equal(state["guide"][name], value), name
        assert name not in state["ema"] or not torch.equal(state["ema"][name], value) or \
            value.abs().sum() == 0 or "class" in name  # the EMA moved on after the snapshot
    model = load_model(trainer.checkpoint_dir / ckpt.LATEST, "cpu")
    assert model.guide is not None
    guided = generate_images(model, 4, show_images=False, progress=False)  # the config's A = 2
    plain = generate_images(model, 4, show_images=False, progress=False, autoguidance=1.0)
    assert guided.shape == plain.shape and not torch.equal(guided, plain)
    without = train(tiny(MAX_STEPS=8, GUIDE_AT=0.0,
                         CHECKPOINT_DIR=str(trainer.checkpoint_dir.parent / "b")))
    assert "guide" not in ckpt.load_checkpoint(without.checkpoint_dir / ckpt.LATEST)
    # a run's own guide changes nothing of its training: the same weights
    assert all(torch.equal(a, b) for a, b in zip(without.model.state_dict().values(),
                                                 trainer.model.state_dict().values()))


def test_a_guide_with_its_own_ema_width(tiny, monkeypatch):
    """GUIDE_EMA_STD: the guide is a second power EMA of that width (EDM2's rule, recomputed
    here from the weights after each step), kept at GUIDE_AT, and it changes nothing else."""
    from config import ConfigError
    from training.schedules import power_ema_gamma
    from training.trainer import Trainer

    weights, original = [], Trainer.train_step

    def spy(self, *args):
        out = original(self, *args)
        weights.append([p.detach().clone() for p in self.params])
        return out

    monkeypatch.setattr(Trainer, "train_step", spy)
    own = train(tiny(MAX_STEPS=8, GUIDE_AT=0.5, GUIDE_EMA_STD=0.2, EMA_STD=0.05, EMA_RULE="power"))
    assert own.guide_step == 4 and own.guide_ema is None  # the second EMA ends at the snapshot
    gamma = power_ema_gamma(0.2)
    expected = [p.clone() for p in own.ema_params]  # any start: the first update replaces it
    for step, after in enumerate(weights[:own.guide_step]):
        keep = (1.0 - 1.0 / (step + 1)) ** (gamma + 1.0)
        expected = [keep * e + (1 - keep) * w for e, w in zip(expected, after)]
    for value, guide in zip(expected, own.ema.guide.parameters()):
        torch.testing.assert_close(guide, value, rtol=1e-5, atol=1e-6)
    weights.clear()
    plain = train(tiny(MAX_STEPS=8, GUIDE_AT=0.5, EMA_STD=0.05, EMA_RULE="power",
                       CHECKPOINT_DIR=str(own.checkpoint_dir.parent / "plain")))
    assert not all(torch.equal(a, b) for a, b in zip(plain.ema.guide.parameters(),
                                                      own.ema.guide.parameters()))
    for a, b in ((plain.model, own.model), (plain.ema, own.ema)):  # the same training and EMA
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     b.state_dict().values()))
    assert "guide_ema" not in ckpt.load_checkpoint(own.checkpoint_dir / ckpt.LATEST)
    with pytest.raises(ConfigError, match="--guide-ema-std"):
        tiny(GUIDE_EMA_STD=0.3)


def test_the_command_line(tiny, tmp_path, capsys):
    run = train(tiny(MAX_STEPS=4, GUIDE_AT=0.25))
    other = train(tiny(MAX_STEPS=2, CHECKPOINT_DIR=str(tmp_path / "other"), GUIDE_AT=0.0))
    latest, weak = run.checkpoint_dir / ckpt.LATEST, other.checkpoint_dir / ckpt.LATEST
    out = tmp_path / "ag.png"
    assert generate.main(list(map(str, ["--checkpoint", latest, "--autoguidance", "2",
                                        "--output", out, "--quiet", "--num-samples", "4"]))) == 0
    printed = capsys.readouterr().out
    assert out.exists() and "autoguidance 2" in printed and "early snapshot" in printed
    assert generate.main(list(map(str, [
        "--checkpoint", latest, "--autoguidance", "2", "--guide", weak, "--guidance-interval",
        "0.1", "5", "--output", tmp_path / "b.png", "--quiet", "--num-samples", "4"]))) == 0
    assert f"guide: {weak}" in capsys.readouterr().out
    folder = tmp_path / "sweep"  # several values: a picture each, none drawn over another
    assert generate.main(list(map(str, ["--checkpoint", latest, "--autoguidance", "1", "1.5",
                                        "--output-dir", folder, "--quiet", "--num-samples", "4"]))) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["samples_ag1.5.png", "samples_ag1.png"]
    line = expect_one_line(capsys, generate.main, ["--checkpoint", weak, "--autoguidance", "2",
                                                   "--output", tmp_path / "c.png", "--quiet"])
    assert "needs a guide" in line and "--guide" in line
    mismatched = train(tiny(MAX_STEPS=1, CHECKPOINT_DIR=str(tmp_path / "v"), PREDICTION="v"))
    line = expect_one_line(capsys, generate.main,
                           ["--checkpoint", latest, "--autoguidance", "2", "--guide",
                            mismatched.checkpoint_dir / ckpt.LATEST, "--output",
                            tmp_path / "d.png", "--quiet"])
    assert "--guide" in line and "PREDICTION" in line
    line = expect_one_line(capsys, generate.main, ["--checkpoint", latest, "--guidance-interval",
                                                   "5", "1", "--quiet"])
    assert "LO < HI" in line


def test_every_run_keeps_a_guide_and_models_without_classes_use_it():
    """The measured default (docs/sampling.md#autoguidance): every run keeps its EMA at 1/8
    of the budget; the CPU preset samples a model with classes (the dataset's, or clusters
    of its images, --no-conditional's default) with A = 1.25 (Fashion-MNIST with its labels:
    1.5 inside the interval), one without either with A = 2 inside the interval; explicit
    values win."""
    from config import Config

    assert Config().GUIDE_AT == Config.from_preset("cpu").GUIDE_AT == 0.125
    assert (Config().GUIDE_EMA_STD, Config.from_preset("cpu").GUIDE_EMA_STD) == (0.0, 0.18)
    assert Config.from_preset("cpu", DATASET="fashion-mnist").GUIDE_EMA_STD == 0.18
    assert Config.from_preset("cpu", CONDITIONAL=False).GUIDE_EMA_STD == 0.18  # clusters
    assert Config.from_preset("cpu", CONDITIONAL=False, CLUSTERS=0).GUIDE_EMA_STD == 0.0  # no gain
    assert Config.from_preset("cpu").AUTOGUIDANCE == 1.25
    assert Config.from_preset("cpu", AUTOGUIDANCE=1.0).AUTOGUIDANCE == 1.0
    clusters = Config.from_preset("cpu", CONDITIONAL=False)
    assert (clusters.CLUSTERS, clusters.AUTOGUIDANCE, clusters.GUIDANCE_INTERVAL) == (100, 1.25, ())
    plain = Config.from_preset("cpu", CONDITIONAL=False, CLUSTERS=0)
    assert (plain.AUTOGUIDANCE, plain.GUIDANCE_INTERVAL) == (2.0, (0.28, 5.42))
    assert Config.from_preset("cpu").GUIDANCE_INTERVAL == ()  # with labels: everywhere
    assert Config.from_preset("cpu", CONDITIONAL=False, CLUSTERS=0,
                              AUTOGUIDANCE=1.0).AUTOGUIDANCE == 1.0
    assert Config.from_preset("none").AUTOGUIDANCE == 1.0  # not measured on the GPU model
    fashion = Config.from_preset("cpu", DATASET="fashion-mnist")  # its own best, measured
    assert (fashion.AUTOGUIDANCE, fashion.GUIDANCE_INTERVAL) == (1.5, (0.1, 5.42))
    assert Config.from_preset("cpu", DATASET="fashion-mnist",
                              GUIDANCE_INTERVAL=(0.28, 5.42)).GUIDANCE_INTERVAL == (0.28, 5.42)
    assert (fashion.SAMPLING_STEPS, Config.from_preset("cpu").SAMPLING_STEPS) == (40, 20)
    assert Config.from_preset("cpu", DATASET="fashion-mnist", SAMPLING_STEPS=20).SAMPLING_STEPS == 20
    assert Config.from_preset("cpu", DATASET="fashion-mnist", AUTOGUIDANCE=1.0).AUTOGUIDANCE == 1.0
    fashion_clusters = Config.from_preset("cpu", DATASET="fashion-mnist", CONDITIONAL=False)
    assert (fashion_clusters.AUTOGUIDANCE, fashion_clusters.GUIDANCE_INTERVAL) == (1.25, ())


def test_a_recorded_guidance_interval_is_the_default_and_the_flag_wins():
    """main.py --guidance-interval records (LO, HI) in the run's config; sampling uses it
    unless generate.py's flag says otherwise (0 inf: every noise level)."""
    import math

    import main
    from config import Config, ConfigError, config_overrides
    from sampling.settings import resolve

    args = main.build_parser().parse_args(["--guidance-interval", "0.28", "5.42"])
    recorded = Config(**config_overrides(args)).validate()
    assert recorded.GUIDANCE_INTERVAL == (0.28, 5.42)
    assert Config.from_dict(recorded.to_dict()).GUIDANCE_INTERVAL == (0.28, 5.42)
    assert resolve(recorded).interval == (0.28, 5.42)
    assert resolve(recorded, interval=(1.0, 2.0)).interval == (1.0, 2.0)
    assert resolve(recorded, interval=(0.0, math.inf)).interval is None
    assert resolve(Config()).interval is None
    with pytest.raises(ConfigError, match="LO < HI"):
        Config(GUIDANCE_INTERVAL=(5.0, 1.0)).validate()
