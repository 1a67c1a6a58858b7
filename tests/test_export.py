"""Models in the Hugging Face layout (utils/hub.py, sampling/export.py, scripts/export.py):
an export loads back from its folder alone and draws the same images bit for bit; the
folder opens with safetensors and huggingface_hub on their own; its card says what the
checkpoint recorded; the machine a run trained on is recorded; every bad folder is one line.
Nothing here touches a network."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import generate
import main
from config import Config, config_overrides, flag_for, training_command
from helpers import ROOT, expect_one_line, run_script, train
from sampling.api import generate_images, load_model
from scripts import export as export_script
from utils import machine
from utils.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def export(checkpoint, out, *more) -> Path:
    assert export_script.main(["--checkpoint", str(checkpoint), "--out", str(out), *map(str, more)]) == 0
    return Path(out)


def test_an_export_draws_the_same_images_as_its_checkpoint_bit_for_bit(tiny, tmp_path):
    trainer = train(tiny(MAX_STEPS=4, CONDITIONAL=True, GUIDE_AT=0.5))
    checkpoint = trainer.checkpoint_dir / "latest.pt"
    folder = export(checkpoint, tmp_path / "hub")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                       "guide.safetensors", "model.safetensors"]
    ours, theirs = load_model(checkpoint, "cpu"), load_model(folder, "cpu")
    for kwargs in (dict(), dict(digits=[3], guidance=2.0), dict(autoguidance=2.0),
                   dict(sampler="ddpm")):
        a = generate_images(ours, 6, show_images=False, progress=False, seed=5, **kwargs)
        b = generate_images(theirs, 6, show_images=False, progress=False, seed=5, **kwargs)
        assert torch.equal(a, b), kwargs
    assert theirs.config == ours.config.replace(CHECKPOINT_DIR="", OUTPUT_DIR="", DATA_DIR="")
    # the weights open with the safetensors library alone: the EMA state dict, no pickle
    state = load_checkpoint(checkpoint)
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == state["ema"].keys()
    assert all(torch.equal(weights[k], state["ema"][k]) for k in weights)
    assert all(torch.equal(v, state["guide"][k])
               for k, v in load_file(folder / "guide.safetensors").items())
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "weights": "ema", "step": "4"}
    config = json.loads((folder / "config.json").read_text())
    assert Config.from_dict(config) == theirs.config
    # the command line takes the folder too
    assert generate.main(["--checkpoint", str(folder), "--num-samples", "2", "--quiet",
                          "--output", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_the_shipped_model_exports_in_one_command(tmp_path):
    folder = export("pretrained", tmp_path / "pretrained")
    assert not (folder / "guide.safetensors").exists()
    a = generate_images(load_model("pretrained", "cpu"), 4, show_images=False, progress=False)
    b = generate_images(load_model(folder, "cpu"), 4, show_images=False, progress=False)
    assert torch.equal(a, b)
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and card.data.datasets == ["ylecun/mnist"]
    assert [r.metric_value for r in card.data.eval_results] == [3.63]
    assert "3.63 (2.88)" in card.text and "CC BY-SA 3.0" in card.text
    assert "2-core AMD EPYC CPU (1 thread), PyTorch 2.14.1" in card.text


def test_the_card_says_what_the_checkpoint_records(tiny, tmp_path, shared_evaluator, capsys):
    trainer = train(tiny(MAX_STEPS=3, CONDITIONAL=True))
    checkpoint = trainer.checkpoint_dir / "latest.pt"
    assert generate.main(["--checkpoint", str(checkpoint), "--evaluate", "--num-samples", "20",
                          "--quiet", "--output-dir", str(tmp_path / "eval"),
                          "--output", str(tmp_path / "e.png")]) == 0
    (scored,) = (tmp_path / "eval").glob("eval_*.json")
    result = json.loads(scored.read_text())
    folder = export(checkpoint, tmp_path / "hub", "--eval", scored)
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and "class-conditional" in card.data.tags
    (fid,) = card.data.eval_results
    assert fid.metric_type == "fid" and fid.metric_value == round(result["fid"], 3)
    text = card.text
    assert f"{result['fid']:.2f} ({result['floor']['fid']:.2f})" in text
    assert "--num-samples 20" in text and "mnist_classifier.pt" in text
    assert "3 steps of batch 16 (0.8 epochs)" in text and "the first 64 training images" in text
    assert machine.describe({**machine.record("cpu"), "precision": trainer.precision}) in text
    assert f", {trainer.precision}, PyTorch" in text  # what it trained in
    assert f"`{training_command(trainer.config)}`" in text
    assert "weights: trained on MNIST (CC BY-SA 3.0)" in text


def test_the_machine_is_recorded_where_training_ran(tiny, monkeypatch):
    trainer = train(tiny(MAX_STEPS=2))
    here = {**machine.record("cpu"), "precision": trainer.precision}  # what it trained in
    assert trainer.state_dict()["machines"] == [{"step": 0, **here}]
    again = train(trainer.config.replace(MAX_STEPS=3), resume=trainer.state_dict())
    assert again.state_dict()["machines"] == trainer.state_dict()["machines"]  # the same one
    elsewhere = {**machine.record("cpu"), "cpu": "Another CPU", "cores": 64}
    monkeypatch.setattr(machine, "record", lambda device: elsewhere)
    moved = train(trainer.config.replace(MAX_STEPS=4), resume=again.state_dict())
    assert moved.state_dict()["machines"][1:] == [{"step": 3, **elsewhere, "precision": trainer.precision}]


@pytest.mark.parametrize("preset, changes", [
    ("cpu", {}),
    ("cpu", dict(MAX_STEPS=43000, THREADS=1, SEED=3, CONDITIONAL=False)),
    ("cpu", dict(CONDITIONAL=False, AUTOGUIDANCE=1.0)),  # a flag that undoes a default of --no-conditional
    ("cpu", dict(CONDITIONAL=False, CLUSTERS=0)),  # the design's unconditional model, its own defaults
    ("cpu", dict(CLUSTERS=20)),  # implies --no-conditional
    ("none", dict(CHANNEL_MULT=(1, 2), ATTENTION=False, MAX_MINUTES=5.0, DATASET="folder",
                  DATA_DIR="/my images", CHANNELS=3, IMAGE_SIZE=32)),
])
def test_the_training_command_builds_the_same_config(preset, changes):
    config = Config.from_preset(preset, DEVICE="cpu", **changes).validate()
    command = training_command(config)
    words = shlex.split(command)
    assert words[:4] == ["python", "main.py", "--preset", preset]
    args = main.build_parser().parse_args(words[2:])
    rebuilt = Config.from_preset(args.preset, DEVICE="cpu", **config_overrides(args))
    assert rebuilt == config, command
    flags = {word for word in words[4:] if word.startswith("--")}  # only those needed
    assert flags == {"--no-" + flag_for(k)[2:] if v is False else flag_for(k)
                     for k, v in changes.items()}, command


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    from helpers import tiny_config

    root = tmp_path_factory.mktemp("export")
    trainer = train(tiny_config(root, data_dir, MAX_STEPS=1))
    return export(trainer.checkpoint_dir / "latest.pt", root / "hub")


def _nan(folder: Path):
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors")


def _wider(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "MODEL_CHANNELS": 16}))


DAMAGES = {
    "no config": (lambda f: (f / "config.json").unlink(), "without config.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "without model.safetensors"),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), "empty (0 bytes)"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]), "model.safetensors is truncated or corrupt"),
    "a pickle as weights": (lambda f: shutil.copy(ROOT / "models/weights/mnist_cpu_pretrained.pt",
                                                  f / "model.safetensors"),
                            "model.safetensors is truncated or corrupt"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{MODEL_CHANNELS: 8"),
                        "config.json is not valid JSON"),
    "config not settings": (lambda f: (f / "config.json").write_text("[1, 2]"),
                            "config.json holds no settings"),
    "config cannot build": (lambda f: (f / "config.json").write_text(json.dumps(
        {**json.loads((f / "config.json").read_text()), "MODEL_CHANNELS": -8})),
        "config.json does not describe a model this code can build: --model-channels must be positive"),
    "weights of another model": (_wider, "model.safetensors does not fit the model its config "
                                         "describes: size mismatch for unet."),
    "non-finite weights": (_nan, "model.safetensors holds non-finite weights (unet."),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_bad_model_folder_is_one_line(damage, exported, tmp_path, capsys):
    folder = tmp_path / "damaged"
    shutil.copytree(exported, folder)
    spoil, expected = DAMAGES[damage]
    spoil(folder)
    line = expect_one_line(capsys, generate.main, ["--checkpoint", folder, "--num-samples", 2,
                                                   "--quiet", "--output", tmp_path / "x.png"])
    assert line.startswith("generate.py: error: ") and expected in line, line


def test_a_run_folder_is_named_by_its_checkpoint(tiny, tmp_path, capsys):
    trainer = train(tiny(MAX_STEPS=1))
    line = expect_one_line(capsys, generate.main, ["--checkpoint", trainer.checkpoint_dir,
                                                   "--quiet", "--output", tmp_path / "x.png"])
    assert "without config.json and model.safetensors" in line
    assert f"name its checkpoint, {trainer.checkpoint_dir / 'latest.pt'}" in line


def test_raw_weights_are_not_in_an_export(exported, tmp_path, capsys):
    line = expect_one_line(capsys, generate.main, ["--checkpoint", exported, "--raw-weights",
                                                   "--quiet", "--output", tmp_path / "x.png"])
    assert "holds the averaged (EMA) weights only" in line


def test_export_mistakes_are_one_line(tiny, tmp_path, capsys):
    trainer = train(tiny(MAX_STEPS=1))
    checkpoint = trainer.checkpoint_dir / "latest.pt"
    other = tmp_path / "eval.json"
    other.write_text(json.dumps({"checkpoint": "runs/other/latest.pt", "fid": 3.0,
                                 "num_samples": 10}))
    line = expect_one_line(capsys, export_script.main, ["--checkpoint", checkpoint, "--out",
                                                        tmp_path / "exported", "--eval", other])
    assert f"--eval {other} scored runs/other/latest.pt, not {checkpoint}" in line
    (tmp_path / "notes.txt").write_text("")
    line = expect_one_line(capsys, export_script.main, ["--checkpoint", checkpoint, "--out",
                                                        tmp_path / "notes.txt"])
    assert "is a file; name a folder" in line
    line = expect_one_line(capsys, export_script.main, ["--checkpoint", tmp_path / "nope.pt",
                                                        "--out", tmp_path / "exported"])
    assert "does not exist" in line
    assert not (tmp_path / "exported").exists()


def test_exporting_again_replaces_the_files_and_drops_an_old_guide(tmp_path, tiny, capsys):
    guided = train(tiny(MAX_STEPS=2, GUIDE_AT=0.5)).checkpoint_dir / "latest.pt"
    plain = train(tiny(MAX_STEPS=2, GUIDE_AT=0.0, CHECKPOINT_DIR=str(tmp_path / "plain"))).checkpoint_dir
    folder = export(guided, tmp_path / "hub")
    assert (folder / "guide.safetensors").is_file()
    export(plain / "latest.pt", folder)
    assert "replaced config.json, model.safetensors, guide.safetensors, README.md" in \
        capsys.readouterr().out
    assert not (folder / "guide.safetensors").exists()
    assert load_model(folder, "cpu").guide is None


@pytest.mark.slow
def test_the_script_runs_as_a_file_from_any_folder(tmp_path):
    result = run_script("scripts/export.py", "--checkpoint", "pretrained", "--out", "hub",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hub" / "model.safetensors").is_file()
    assert "hf upload USER/NAME hub" in result.stdout
