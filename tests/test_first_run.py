"""A first run that explains itself: --help fits the machine and is grouped, one picture
rule everywhere, the plan names what lies outside the budget, and Ctrl-C before training
is one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
import main
from helpers import TINY_FLAGS, expect_one_line, tiny_config, train
from sampling.settings import arrange, default_count, labels_for
from scripts import classifier as classifier_script


def test_help_groups_the_flags_and_shows_this_machines_defaults(capsys):
    with pytest.raises(SystemExit):
        main.main(["--help"])
    text = capsys.readouterr().out
    groups = [line for line in text.splitlines() if line and not line.startswith(" ")
              and line.endswith(":")]
    assert groups[:3] == ["options:", "the run:", "common settings:"]
    assert {"data:", "model (UNet):", "training:", "sampling:"} <= set(groups)
    common = text[text.index("common settings:"):text.index("data:")]
    assert "--batch-size" in common and "--max-minutes" in common and "--dataset" in common
    if not torch.cuda.is_available():  # the CPU preset is what runs here
        assert "32 on this machine (--preset cpu); 128 with --preset none" in \
            " ".join(common.split())


def test_the_cpu_preset_says_why_it_keeps_its_width(capsys):
    """The first line names the width the budget chose and the docs' section that measured
    it; a width asked for is said to be asked for (and no parameter count of another model)."""
    if torch.cuda.is_available():
        pytest.skip("--preset auto is the CPU preset only on a machine without CUDA")
    parser = main.build_parser()
    main.build_config(parser.parse_args(["--max-minutes", "60"]))
    first = capsys.readouterr().out.splitlines()[0]
    assert "16 channels for this budget" in first and "lost at 15 and at 60 minutes" in first
    section = first.split("docs/training.md#")[1].split(")")[0]
    training = (Path(main.__file__).parent / "docs" / "training.md").read_text()
    assert f"## {section.replace('-', ' ').capitalize()}" in training
    main.build_config(parser.parse_args(["--model-channels", "24"]))
    first = capsys.readouterr().out.splitlines()[0]
    assert "24 channels as asked" in first and "0.26M" not in first


def test_one_picture_rule_everywhere(tiny):
    """One row per class asked for, left to right; without classes a square-ish grid at
    most 10 wide; 10 per class by default (100 without classes)."""
    images = torch.arange(20).float().reshape(20, 1, 1, 1)
    shown, width = arrange(images, list(range(10)))
    assert width == 2 and shown[:2, 0, 0, 0].tolist() == [0, 10]  # row 0: digit 0's images
    assert labels_for([3, 7], 4).tolist() == [3, 7, 3, 7]
    assert arrange(images[:16], None)[1] == 4 and arrange(images, [5])[1] == 5
    assert arrange(torch.zeros(100, 1, 1, 1), None)[1] == 10
    assert default_count([7]) == 10 and default_count(list(range(10))) == 100
    assert default_count(None) == 100
    trainer = train(tiny(MAX_STEPS=1, CONDITIONAL=True, NUM_SAMPLES=20))
    grid = Image.open(f"{trainer.config.OUTPUT_DIR}/samples_final.png")
    assert grid.size == (2 * (2 * 30 + 2), 2 * (10 * 30 + 2))  # ten rows (digits) of two


@pytest.mark.slow
def test_the_plan_says_evaluations_lie_outside_the_budget(capsys, tmp_path):
    assert main.main([*TINY_FLAGS, "--max-steps", "4", "--eval-every", "1", "--eval-samples",
                      "10", "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan:"))
    assert "evaluation(s) of 10 samples" in plan and "outside the budget" in plan


@pytest.mark.parametrize("entry, prog", [(main.main, "main.py"),
                                         (classifier_script.main, "python -m scripts.classifier")])
def test_ctrl_c_while_loading_is_one_line(capsys, monkeypatch, entry, prog):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "build_config", interrupted)
    monkeypatch.setattr(classifier_script, "open_dataset", interrupted)
    line = expect_one_line(capsys, entry, [], code=130)
    assert line.startswith(f"{prog}: interrupted")


def test_status_lines_say_what_each_picture_is(capsys, tmp_path):
    model_path = train(tiny_config(tmp_path, MAX_STEPS=1, CONDITIONAL=True)).checkpoint_dir
    assert generate.main(["--checkpoint", str(model_path / "latest.pt"), "--interpolate",
                          "--interpolate-real", "0", "1", "--inversion-steps", "3",
                          "--num-steps", "3", "--pairs", "1", "--quiet", "--output",
                          str(tmp_path / "i.png")]) == 0
    out = capsys.readouterr().out
    assert "DDIM with 5 steps, eta 0 (deterministic)" in out  # not the grid's sampler
    assert "test images #0 (a 7) and #1 (a 2)" in out


def test_the_api_draws_the_picture_the_command_line_draws(tiny, tmp_path):
    """generate_images and generate.py lay out the same images the same way: ten a class
    at most (a row each), fewer images than classes one a row."""
    import generate
    from sampling.api import generate_images, load_model

    trainer = train(tiny(MAX_STEPS=1, CONDITIONAL=True))
    checkpoint = str(trainer.checkpoint_dir / "latest.pt")
    model = load_model(checkpoint, "cpu")
    generate_images(model, 36, digits=[1, 2, 3], save_path=tmp_path / "api.png",
                    show_images=False, progress=False)
    assert generate.main(["--checkpoint", checkpoint, "--digit", "1-3", "--num-samples", "36",
                          "--output", str(tmp_path / "cli.png"), "--quiet"]) == 0
    api, cli = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("api", "cli"))
    assert api.shape == cli.shape == (2 * (3 * 30 + 2), 2 * (10 * 30 + 2)) and (api == cli).all()
    assert arrange(torch.zeros(5, 1, 1, 1), list(range(10)))[1] == 1  # one image, one row each
