"""Editing real images: inpainting keeps the known pixels exactly, SDEdit at strength 0
returns its input, per-image seeds make both independent of the batch, masks that hide
nothing or everything behave, and bad masks or class requests are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from helpers import expect_one_line, tiny_config, train
from models.diffusion import DiffusionModel
from sampling.api import edit_images, inpaint_images
from sampling.editing import check_mask, inpaint, make_mask, sdedit
from sampling.settings import resolve
from utils import checkpoint as ckpt
from utils.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiffusionModel(timesteps=1000, model_channels=8, time_embed_dim=16, channel_mult=(1, 2),
                       num_res_blocks=1, attention=False, prediction="v", num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def images(mnist):
    return mnist.load("test")[0][:6]


def test_inpainting_keeps_the_known_pixels_exactly(model, images):
    mask = make_mask("top", len(images), 28)
    out = inpaint(model, images, mask, steps=4, resample=2)
    real = images.float() / 127.5 - 1
    known = mask.bool().expand_as(out)
    assert torch.equal(out[known], real[known])  # not approximately: exactly
    assert not torch.allclose(out[~known], real[~known], atol=0.1)  # the rest is drawn
    assert out.min() >= -1 and out.max() <= 1


def test_a_mask_that_hides_nothing_or_everything(model, images):
    nothing = torch.ones(1, 1, 28, 28)
    assert torch.equal(inpaint(model, images, nothing, steps=3, resample=1),
                       images.float() / 127.5 - 1)
    everything = torch.zeros(1, 1, 28, 28)
    drawn = inpaint(model, images, everything, steps=3, resample=2)
    assert torch.isfinite(drawn).all() and not torch.allclose(drawn, images.float() / 127.5 - 1,
                                                              atol=0.1)


def test_resampling_changes_the_completion_and_the_baseline_is_replacement(model, images):
    mask = make_mask("centre", len(images), 28)
    once = inpaint(model, images, mask, steps=4, resample=1)
    twice = inpaint(model, images, mask, steps=4, resample=3)
    assert not torch.allclose(once, twice)


@pytest.mark.parametrize("edit", ["inpaint", "sdedit"])
def test_per_image_seeds_make_edits_independent_of_the_batch(model, images, edit):
    settings = resolve(model.config, steps=4)
    labels = torch.arange(len(images)) % 10

    def run(part: slice):
        if edit == "inpaint":
            return inpaint(model, images[part], make_mask("random", 6, 28)[part], steps=4,
                           resample=2, labels=labels[part], guidance=2.0, seed=3,
                           first_index=part.start or 0)
        return sdedit(model, images[part], 0.6, settings, labels[part], seed=3,
                      first_index=part.start or 0)

    whole = run(slice(0, 6))
    pieces = torch.cat([run(slice(0, 2)), run(slice(2, 6))])
    torch.testing.assert_close(whole, pieces, rtol=0, atol=1e-4)  # up to float rounding


def test_sdedit_at_strength_0_is_the_input_and_at_1_ignores_it(model, images):
    settings = resolve(model.config, steps=4)
    real = images.float() / 127.5 - 1
    assert torch.equal(sdedit(model, images, 0.0, settings), real)
    full = sdedit(model, images, 1.0, settings, seed=1)
    other_input = sdedit(model, images.flip(0), 1.0, settings, seed=1)
    # at strength 1 almost nothing of the input survives (alpha_bar at T-1 is ~0)
    assert (full - other_input).abs().mean() < 0.05 * (full - real).abs().mean() + 0.02
    half = sdedit(model, images, 0.3, settings, seed=1)
    assert (half - real).abs().mean() < (full - real).abs().mean()
    with pytest.raises(ConfigError, match="--strength must lie in"):
        sdedit(model, images, 1.5, settings)


def test_bad_masks_are_one_clear_error(images):
    with pytest.raises(ConfigError, match=r"shape \(N or 1, 1, H, W\)"):
        check_mask(torch.ones(1, 1, 14, 14), images)
    with pytest.raises(ConfigError, match="only 0 .* and 1"):
        check_mask(torch.full((1, 1, 28, 28), 0.5), images)
    with pytest.raises(ConfigError, match="unknown --mask 'diagonal'"):
        make_mask("diagonal", 1, 28)


def test_the_api_draws_the_pictures_and_aims_at_a_digit(model, images, tmp_path, monkeypatch):
    import sampling.api as api

    drawn = {}
    real_save = api.save_labelled_grid
    monkeypatch.setattr(api, "save_labelled_grid", lambda grid, path, ncol, columns, *rest, **kw:
                        drawn.update(grid=grid, ncol=ncol, columns=columns)
                        or real_save(grid, path, ncol, columns, *rest, **kw))
    mask = make_mask("left", 2, 28)
    filled = inpaint_images(model, images[:2], mask, completions=3, steps=3, resample=2,
                            digits=[7], save_path=tmp_path / "i.png")
    assert filled.shape == (2, 3, 1, 28, 28) and (tmp_path / "i.png").is_file()
    # a row per image: the masked input, the completions, the original; columns named
    assert drawn["ncol"] == 5 and drawn["columns"] == ["masked", "#1", "#2", "#3", "original"]
    rows = drawn["grid"].reshape(2, 5, 1, 28, 28)
    real = images[:2].float() / 127.5 - 1
    assert torch.equal(rows[:, 0], real * mask) and torch.equal(rows[:, 4], real)
    assert torch.equal(rows[:, 1:4], filled)
    edited = edit_images(model, images[:2], [0.0, 0.5], digits=[8], steps=3,
                         save_path=tmp_path / "e.png")
    assert edited.shape == (2, 2, 1, 28, 28) and (tmp_path / "e.png").is_file()
    assert torch.equal(edited[:, 0], images[:2].float() / 127.5 - 1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("edit")
    cond = train(tiny_config(tmp / "c", data_dir, MAX_STEPS=2, CONDITIONAL=True))
    plain = train(tiny_config(tmp / "p", data_dir, MAX_STEPS=2))
    return cond.checkpoint_dir / ckpt.LATEST, plain.checkpoint_dir / ckpt.LATEST


def test_inpaint_and_edit_from_the_command_line_with_scores(checkpoints, tmp_path, capsys,
                                                            shared_evaluator):
    out = tmp_path / "out"
    assert generate.main(["--checkpoint", str(checkpoints[0]), "--inpaint", "--mask", "top",
                          "random", "--inputs", "10", "--steps", "3", "--resample", "2",
                          "--completions", "2", "--evaluate", "--quiet", "--output-dir",
                          str(out), "--output", str(out / "p.png")]) == 0
    printed = capsys.readouterr().out
    assert "RePaint (x2)" in printed and "replacement (no resampling) (x1)" in printed
    assert (out / "p_top.png").is_file() and (out / "p_random.png").is_file()
    [report] = [json.loads(p.read_text()) for p in out.glob("eval_*editing*.json")]
    assert len(report["inpaint"]) == 4 and all(r["known_pixel_error"] == 0
                                               for r in report["inpaint"])
    assert [(r["mask"], r["resample"]) for r in report["inpaint"]] == [
        ("top", 2), ("top", 1), ("random", 2), ("random", 1)]
    assert generate.main(["--checkpoint", str(checkpoints[0]), "--edit", "--digit", "8",
                          "--strength", "0", "0.5", "--inputs", "10", "--steps", "3",
                          "--evaluate", "--quiet", "--output-dir", str(out), "--output",
                          str(out / "e.png")]) == 0
    [edits] = [r["edit"] for r in (json.loads(p.read_text()) for p in out.glob("eval_*editing*"))
               if "edit" in r]
    assert [e["strength"] for e in edits] == [0, 0.5] and edits[0]["distance_to_input"] == 0


def test_edit_your_own_picture(checkpoints, tmp_path, capsys, shared_evaluator):
    """--input takes image files (any size: resized to the model's) and test indices."""
    mine = tmp_path / "mine.png"
    picture = np.zeros((56, 70), np.uint8)
    picture[10:46, 30:40] = 255  # a "1", larger than the model's images and not square
    Image.fromarray(picture).save(mine)
    out = tmp_path / "out"
    assert generate.main(["--checkpoint", str(checkpoints[0]), "--inpaint", "--input", str(mine),
                          "7", "--steps", "3", "--resample", "1", "--completions", "2",
                          "--quiet", "--output", str(out / "in.png")]) == 0
    assert "inpainting 2 images given" in capsys.readouterr().out
    assert Image.open(out / "in.png").size[0] > 0
    assert generate.main(["--checkpoint", str(checkpoints[0]), "--edit", "--input", str(mine),
                          "--strength", "0", "1", "--digit", "7", "--steps", "3", "--evaluate",
                          "--quiet", "--output-dir", str(out), "--output", str(out / "e.png")]) == 0
    printed = capsys.readouterr().out
    assert "SDEdit of 1 images given" in printed and "right class" in printed
    assert generate.main(["--checkpoint", str(checkpoints[0]), "--edit", "--input", "3", "9",
                          "--strength", "0.5", "--steps", "3", "--quiet", "--output",
                          str(out / "t.png")]) == 0
    assert "SDEdit of 2 test images" in capsys.readouterr().out


def test_editing_bad_requests_are_one_line(checkpoints, tmp_path, capsys):
    cond, plain = (str(c) for c in checkpoints)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((14, 14), 255, np.uint8)).save(small)
    for argv, message in (
            ([cond, "--inpaint", "--mask", str(small)], "is 14x14 pixels; the model's images "
                                                         "are 28x28"),
            ([cond, "--inpaint", "--mask", "diagonal"], "unknown --mask 'diagonal'"),
            ([cond, "--edit", "--strength", "2"], "--strength must lie in [0, 1]"),
            ([cond, "--inpaint", "--resample", "0"], "--resample must be positive"),
            ([plain, "--inpaint", "--digit", "3"], "needs a class-conditional checkpoint"),
            ([cond, "--inpaint", "--inputs", "20000"], "--inputs 20000: the test set has 10,000"),
            ([cond, "--edit", "--input", "nowhere.png"], "--input nowhere.png: no such file"),
            ([cond, "--edit", "--input", "10000"], "--input 10000: test-set indices run from 0")):
        line = expect_one_line(capsys, generate.main, ["--checkpoint", *argv, "--quiet",
                                                       "--output", str(tmp_path / "x.png")])
        assert message in line, line


def test_every_path_to_the_network_tunes_the_allocator(model, images, monkeypatch):
    """Sampling, inpainting and SDEdit all keep the per-step temporaries off mmap (editing
    once bypassed it: 6 s of system time in 22 s)."""
    from utils import allocator

    calls = []
    monkeypatch.setattr(allocator, "tune", lambda: calls.append(1) or True)
    settings = resolve(model.config, steps=2)
    for run in (lambda: model.sample((2, 1, 28, 28), sampler="ddim", steps=2),
                lambda: inpaint(model, images[:2], make_mask("top", 2, 28), steps=2, resample=1),
                lambda: sdedit(model, images[:2], 0.5, settings)):
        calls.clear()
        run()
        assert calls, run
