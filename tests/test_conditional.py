"""Class-conditional training and classifier-free guidance (Ho & Salimans 2022)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import generate
import main
from config import Config
from helpers import expect_one_line, quiet
from models.diffusion import DiffusionModel
from training.benchmark import benchmark_sampling
from training.trainer import Trainer
from utils import checkpoint as ckpt
from utils.data_loader import to_uint8


def _random_conditional_model(prediction="v") -> DiffusionModel:
    """A small conditional model with every weight random (none zero), so that the class
    embedding and every layer matter."""
    torch.manual_seed(0)
    model = DiffusionModel(timesteps=100, model_channels=8, time_embed_dim=16,
                           channel_mult=(1, 2), num_res_blocks=1, attention=False,
                           prediction=prediction, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def _inputs(b=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, 28, 28, generator=g)
    t = torch.randint(0, 100, (b,), generator=g)
    y = torch.arange(b) % 10
    return x, t, y


def test_guidance_0_is_the_unconditional_and_1_the_conditional_prediction():
    model = _random_conditional_model()
    x, t, y = _inputs()
    with torch.no_grad():
        uncond = model.unet(x, t, torch.full_like(y, model.null_label))
        cond = model.unet(x, t, y)
        assert not torch.allclose(uncond, cond)  # the class matters
        assert torch.equal(model.denoiser(labels=y, guidance=0.0)(x, t), uncond)
        assert torch.equal(model.denoiser(labels=y, guidance=1.0)(x, t), cond)
        assert torch.equal(model.unet(x, t, None), uncond)  # None means "no class"


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_the_doubled_batch_equals_two_separate_calls(monkeypatch, w):
    model = _random_conditional_model()
    x, t, y = _inputs()
    with torch.no_grad():
        uncond = model.unet(x, t, torch.full_like(y, model.null_label))
        cond = model.unet(x, t, y)
        calls = []
        forward = model.unet.forward
        monkeypatch.setattr(model.unet, "forward",
                            lambda *a: calls.append(a[0].shape[0]) or forward(*a))
        guided = model.denoiser(labels=y, guidance=w)(x, t)
    assert calls == [2 * len(x)]  # one network call on the doubled batch
    torch.testing.assert_close(guided, uncond + w * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guidance_rescale_matches_the_conditional_std():
    """phi = 1 gives each image the standard deviation of its conditional output."""
    model = _random_conditional_model()
    x, t, y = _inputs()
    with torch.no_grad():
        cond = model.unet(x, t, y)
        out = model.denoiser(labels=y, guidance=4.0, rescale=1.0)(x, t)
        plain = model.denoiser(labels=y, guidance=4.0)(x, t)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert not torch.allclose(out, plain)


# guidance lives in the denoiser that every sampler calls: one deterministic and two
# stochastic samplers stand for all
@pytest.mark.parametrize("sampler,eta", [("ddpm", 1.0), ("ddim", 0.0), ("dpm-solver", 1.0)])
def test_every_sampler_guides_and_image_i_depends_on_seed_index_and_digit(sampler, eta):
    model = _random_conditional_model()
    steps = None if sampler == "ddpm" else 5
    kwargs = dict(sampler=sampler, steps=steps, eta=eta, seed=3, guidance=3.0, progress=False)
    labels = torch.tensor([7, 1, 7, 4, 0])
    whole = model.generate(5, batch_size=5, labels=labels, **kwargs)
    parts = model.generate(5, batch_size=2, labels=labels, **kwargs)
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-4)
    alone = model.generate(1, first_index=2, labels=labels[2:3], **kwargs)
    torch.testing.assert_close(alone[0], whole[2], rtol=1e-4, atol=1e-4)
    other_digit = model.generate(1, first_index=2, labels=torch.tensor([3]), **kwargs)
    assert not torch.allclose(other_digit[0], whole[2])
    unguided = model.generate(5, batch_size=5, labels=labels, **{**kwargs, "guidance": 1.0})
    assert not torch.allclose(unguided, whole)


def test_class_weights_interpolate_the_embedding():
    model = _random_conditional_model()
    x, t, _ = _inputs(2)
    onehot = torch.zeros(2, 11)
    onehot[:, 3] = 1
    mixed = torch.zeros(2, 11)
    mixed[:, 3], mixed[:, 8] = 0.25, 0.75
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t, onehot), model.unet(x, t, torch.tensor([3, 3])),
                              atol=1e-6)
        emb = model.unet.embed_class(mixed, 2, "cpu")
        table = model.unet.class_embed.weight
        torch.testing.assert_close(emb, (0.25 * table[3] + 0.75 * table[8]).expand(2, -1))


def test_a_conditional_model_draws_digits_where_none_are_asked_for():
    """Grids and noise interpolations of a conditional model follow digits 0-9 (its "no
    class" branch alone draws poor digits), with the checkpoint's guidance."""
    from models.interpolation import decode, interpolation_path
    from utils.seeding import PerSampleNoise

    model = _random_conditional_model()
    kwargs = dict(show_images=False, progress=False, steps=4)
    torch.testing.assert_close(generate.generate_images(model, 10, **kwargs),
                               generate.generate_images(model, 10, digits=list(range(10)), **kwargs))
    w = Config().GUIDANCE
    strip = generate.generate_interpolation(model, 3, pairs=2, steps=4)  # rows: digits 0 and 1
    noise = PerSampleNoise(0, range(4), model.image_shape, "cpu").initial()
    torch.testing.assert_close(strip, interpolation_path(model, noise[0::2], noise[1::2], 3, 4,
                                                         labels=torch.tensor([0, 1]), guidance=w))
    unlabelled = interpolation_path(model, noise[0::2], noise[1::2], 3, 4)
    assert not torch.allclose(strip, unlabelled)
    sevens = generate.generate_interpolation(model, 3, pairs=2, steps=4, digits=[7], guidance=2.0)
    torch.testing.assert_close(sevens[:, 0], decode(model, noise[0::2], 4,
                                                    labels=torch.tensor([7, 7]), guidance=2.0))
    # between two digits the class moves with the noise: each end is its own digit
    path = interpolation_path(model, noise[:1], noise[1:2], 3, 4,
                              labels=(torch.tensor([3]), torch.tensor([8])))[0]
    torch.testing.assert_close(path[0], decode(model, noise[:1], 4, labels=torch.tensor([3]))[0])
    torch.testing.assert_close(path[-1], decode(model, noise[1:2], 4, labels=torch.tensor([8]))[0])
    # at fixed noise (--interpolate-digits) the class alone moves: its ends are the digits
    morph = generate.generate_class_interpolation(model, 3, 8, num_steps=3, pairs=2, steps=4)
    for column, digit in ((0, 3), (-1, 8)):
        torch.testing.assert_close(morph[:, column], generate.generate_images(
            model, 2, digits=[digit], eta=0.0, **kwargs))


def test_the_sampling_benchmark_times_a_conditional_model_as_it_samples():
    """Digits 0-9 in turn, guided: two network evaluations a step, counted as such."""
    model = _random_conditional_model()
    result = benchmark_sampling(model, count=4, batch=2, steps=3, guidance=2.0, log=quiet)
    assert result["sampling_nfe"] == 6
    expected = model.generate(4, batch_size=2, progress=False, labels=torch.arange(4),
                              guidance=2.0, sampler="dpm-solver", steps=3, seed=0)
    torch.testing.assert_close(result["images"], expected)
    assert benchmark_sampling(model, count=2, batch=2, steps=3, log=quiet)["sampling_nfe"] == 3


def test_the_cpu_preset_is_conditional_unless_asked_not_to_be():
    assert Config.from_preset("cpu").CONDITIONAL
    assert not Config.from_preset("cpu", CONDITIONAL=False).CONDITIONAL
    assert not Config.from_preset("none").CONDITIONAL
    args = main.build_parser().parse_args(["--preset", "cpu", "--no-conditional"])
    assert main.config_overrides(args)["CONDITIONAL"] is False


def test_an_unconditional_model_is_unchanged_and_refuses_labels(tiny):
    config = tiny()
    model = DiffusionModel.from_config(config)
    assert not model.conditional and model.unet.class_embed is None
    assert not any("class_embed" in name for name in model.state_dict())
    with pytest.raises(ValueError, match="without --conditional"):
        model.denoiser(labels=torch.tensor([1]), guidance=2.0)


def test_float_labels_must_be_class_weights():
    model = _random_conditional_model()
    with pytest.raises(ValueError, match=r"class weights of shape \(B, 11\)"):
        model.denoiser(labels=torch.tensor([3.0, 4.0]), guidance=2.0)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_label_dropout_replaces_labels_at_the_configured_rate(tiny, rate):
    trainer = Trainer(tiny(CONDITIONAL=True, CLASS_DROPOUT=rate), progress=False, log=quiet)
    labels = torch.arange(200_000) % 10
    state = trainer.generator.get_state()
    dropped = trainer.drop_labels(labels)
    is_null = dropped == trainer.model.null_label
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others keep their digit
    share = is_null.double().mean().item()
    if rate == 0:
        assert share == 0
    else:
        sd = (rate * (1 - rate) / len(labels)) ** 0.5
        assert abs(share - rate) < 5 * sd, share
    trainer.generator.set_state(state)
    assert torch.equal(trainer.drop_labels(labels), dropped)  # from the trainer's generator


def test_conditional_training_sees_each_images_own_label(tiny):
    """The batcher's labels travel with their images (the label of a batch is that of the
    digits in it, in the same order)."""
    trainer = Trainer(tiny(CONDITIONAL=True), progress=False, log=quiet)
    images, labels = trainer.dataset.load("train")
    for x, y in trainer.batcher.labelled(1, 1):
        for image, label in zip(x, y):
            match = (images[:64, 0].float() / 127.5 - 1 == image[0]).flatten(1).all(1)
            assert labels[:64][match].tolist() == [label.item()]


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("conditional")
    argv = ["--preset", "none", "--conditional", "--max-steps", "4", "--train-size", "64",
            "--batch-size", "16", "--model-channels", "8", "--time-embed-dim", "16",
            "--num-res-blocks", "1", "--no-attention", "--timesteps", "50",
            "--sampling-steps", "4", "--num-samples", "10", "--device", "cpu",
            "--data-dir", str(data_dir), "--checkpoint-dir", str(folder), "--threads", "2",
            "--eval-every", "1", "--eval-samples", "20"]
    assert main.main(argv) == 0
    return folder / ckpt.LATEST


def test_interpolations_take_the_checkpoints_and_the_flags_sampling_settings(
        conditional_checkpoint, tmp_path, monkeypatch):
    """--interpolate-digits samples with the checkpoint's settings (4 steps) unless the
    flags say otherwise; --guidance-rescale reaches every guided interpolation."""
    sampled, guided = [], []
    sample, denoiser = DiffusionModel.sample, DiffusionModel.denoiser
    monkeypatch.setattr(DiffusionModel, "sample", lambda self, shape, **kw: sampled.append(kw)
                        or sample(self, shape, **kw))
    monkeypatch.setattr(DiffusionModel, "denoiser", lambda self, *a: guided.append(a)
                        or denoiser(self, *a))
    base = ["--checkpoint", str(conditional_checkpoint), "--device", "cpu", "--quiet",
            "--interpolate-digits", "3", "8", "--num-steps", "2", "--output", str(tmp_path / "m.png")]
    assert generate.main(base) == 0
    assert {(kw["sampler"], kw["steps"], kw["spacing"]) for kw in sampled} == {("dpm-solver", 4, "auto")}
    sampled.clear()
    assert generate.main([*base, "--sampler", "ddim", "--steps", "3", "--spacing", "time",
                          "--guidance", "2", "--guidance-rescale", "0.7"]) == 0
    assert {(kw["sampler"], kw["steps"], kw["spacing"], kw["eta"], kw["guidance_rescale"])
            for kw in sampled} == {("ddim", 3, "time", 0.0, 0.7)}
    guided.clear()
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--device", "cpu", "--quiet",
                          "--interpolate", "--num-steps", "2", "--guidance", "2",
                          "--guidance-rescale", "0.7", "--output", str(tmp_path / "i.png")]) == 0
    assert guided and {a[2:] for a in guided} == {(2.0, 0.7)}


def test_a_conditional_checkpoint_round_trips_through_generate(conditional_checkpoint, tmp_path,
                                                               data_dir, capsys, monkeypatch):
    state = ckpt.load_checkpoint(conditional_checkpoint)
    assert state["config"]["CONDITIONAL"] is True
    evaluation = state["evaluations"][-1]  # --eval-every during training
    assert evaluation["guidance"] == Config().GUIDANCE and 0 <= evaluation["conditional_accuracy"] <= 1
    npz = tmp_path / "sevens.npz"
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--digit", "7",
                          "--num-samples", "6", "--save-npz", str(npz), "--quiet",
                          "--output", str(tmp_path / "sevens.png"), "--guidance", "3"]) == 0
    with np.load(npz) as data:
        assert data["samples"].shape == (6, 28, 28) and data["labels"].tolist() == [7] * 6
    # the same 7s from Python
    model = generate.load_model(conditional_checkpoint, "cpu")
    images = generate.generate_images(model, 6, digits=[7], guidance=3.0, show_images=False,
                                      progress=False)
    assert np.array_equal(to_uint8(images)[:, 0].numpy(), np.load(npz)["samples"])
    # a class grid, one row per digit, and a guidance strip
    grid = tmp_path / "grid.png"
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--digit", "0-9",
                          "--num-samples", "20", "--output", str(grid), "--quiet"]) == 0
    from PIL import Image

    width, height = Image.open(grid).size
    assert height > 4 * width  # 10 rows of 2
    strip = tmp_path / "strip.png"
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--digit", "3",
                          "--guidance", "0", "1", "2", "4", "8", "--output", str(strip),
                          "--quiet"]) == 0
    assert strip.exists()
    morph = tmp_path / "morph.png"
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--interpolate-digits",
                          "3", "8", "--num-steps", "4", "--pairs", "2", "--output", str(morph),
                          "--quiet"]) == 0
    assert Image.open(morph).size[0] > Image.open(morph).size[1]
    # noise and real-digit interpolations take the digits too (the real ones their labels:
    # test digits 0 and 1 are a 7 and a 2)
    import sampling.api

    inverted_with = []
    invert = sampling.api.invert
    monkeypatch.setattr(sampling.api, "invert", lambda model, images, steps, precision,
                        labels: inverted_with.append(labels.tolist())
                        or invert(model, images, steps, precision, labels))
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--interpolate",
                          "--interpolate-real", "0", "1", "--inversion-steps", "5", "--num-steps",
                          "3", "--pairs", "2", "--output", str(tmp_path / "i.png"), "--quiet",
                          "--data-dir", str(data_dir), "--no-download", "--device", "cpu"]) == 0
    assert "reconstruction error" in capsys.readouterr().out and inverted_with == [[7, 2]]
    assert (tmp_path / "i_interpolation_real_0_1.png").exists()


def test_evaluate_reports_the_conditional_accuracy(conditional_checkpoint, tmp_path, capsys,
                                                   shared_evaluator):
    import json

    out = tmp_path / "eval"
    assert generate.main(["--checkpoint", str(conditional_checkpoint), "--evaluate",
                          "--num-samples", "20", "--guidance", "0", "2", "--quiet",
                          "--output-dir", str(out), "--output", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    assert "the class asked for" in printed and "asked-for" in printed  # report and sweep table
    results = [json.loads(p.read_text()) for p in sorted(out.glob("eval_*.json"))]
    assert sorted(r["guidance"] for r in results) == [0, 2]
    for r in results:
        assert len(r["per_class_accuracy"]) == 10 and 0 <= r["conditional_accuracy"] <= 1
        assert r["floor"]["conditional_accuracy"] > 0.95  # real digits, true labels


def test_conditional_accuracy_of_real_digits(quick_evaluator, mnist):
    images, labels = mnist.load("test")
    right = quick_evaluator.evaluate(images[:500], floor=False, memorisation=False,
                                     precision_recall_k=None, labels=labels[:500])
    wrong = quick_evaluator.evaluate(images[:500], floor=False, memorisation=False,
                                     precision_recall_k=None, labels=(labels[:500] + 1) % 10)
    assert right["conditional_accuracy"] > 0.98 and wrong["conditional_accuracy"] < 0.02
    assert all(a > 0.9 for a in right["per_class_accuracy"])


def test_evaluate_npz_takes_optional_labels(shared_evaluator, data_dir, mnist, tmp_path, capsys):
    images, labels = mnist.load("test")
    images = images[:, 0]
    npz = tmp_path / "real.npz"
    np.savez(npz, samples=images[:50].numpy(), labels=labels[:50].numpy())
    assert generate.main(["--evaluate-npz", str(npz), "--data-dir", str(data_dir),
                          "--output-dir", str(tmp_path), "--quiet"]) == 0
    assert "the class asked for" in capsys.readouterr().out
    bad = tmp_path / "bad.npz"
    np.savez(bad, samples=images[:50].numpy(), labels=np.full(50, 12))
    line = expect_one_line(capsys, generate.main, ["--evaluate-npz", str(bad), "--data-dir",
                                                   str(data_dir)])
    assert "'labels' must be N = 50 integers 0-9" in line


@pytest.mark.parametrize("argv,message", [
    (["--digit", "9-3"], "a range goes up"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0"),
    (["--digit", "3-"], "expected a class 0-9"),
])
def test_bad_digits_and_guidance_are_one_line(capsys, argv, message):
    line = expect_one_line(capsys, generate.main, ["--checkpoint", "whatever.pt", *argv])
    assert message in line


@pytest.mark.parametrize("argv,message", [
    (["--digit", "10"], "--digit 10: this checkpoint's classes are 0-9"),
    (["--digit", "x"], "--digit x: this checkpoint's classes are 0-9"),
    (["--interpolate-digits", "3", "11"], "11: this checkpoint's classes are 0-9"),
])
def test_classes_the_checkpoint_lacks_are_one_line(capsys, conditional_checkpoint, tmp_path,
                                                   argv, message):
    line = expect_one_line(capsys, generate.main, ["--checkpoint", str(conditional_checkpoint),
                                                   "--quiet", "--output",
                                                   str(tmp_path / "x.png"), *argv])
    assert message in line


def test_digit_on_an_unconditional_checkpoint_is_one_line(capsys, tmp_path, data_dir):
    folder = tmp_path / "plain"
    argv = ["--preset", "none", "--max-steps", "1", "--train-size", "16", "--batch-size", "16",
            "--model-channels", "8", "--time-embed-dim", "16", "--num-res-blocks", "1",
            "--no-attention", "--timesteps", "20", "--sampling-steps", "2", "--num-samples",
            "1", "--device", "cpu", "--data-dir", str(data_dir), "--checkpoint-dir",
            str(folder)]
    assert main.main(argv) == 0
    capsys.readouterr()
    for flags in (["--digit", "7"], ["--guidance", "2"], ["--interpolate-digits", "1", "2"]):
        line = expect_one_line(capsys, generate.main,
                               ["--checkpoint", str(folder / ckpt.LATEST), *flags])
        assert "needs a class-conditional checkpoint" in line and "--conditional" in line


def test_config_refuses_bad_conditional_settings():
    from config import ConfigError

    with pytest.raises(ConfigError, match="--class-dropout"):
        Config(CLASS_DROPOUT=1.0).validate()
    with pytest.raises(ConfigError, match="--guidance"):
        Config(GUIDANCE=-0.5).validate()
