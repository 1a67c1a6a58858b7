"""Sharing a model: a checkpoint, or the shipped model, exported as a folder in the Hugging
Face layout (utils/hub.py: config.json, model.safetensors) with its model card, README.md:
what it learned, for how long and on what machine, how well it draws (FID with its floor
and evaluator), the command that trains it again, and the licences.

    export("runs/NAME/latest.pt", "hub/mnist-cpu", ["outputs/eval_latest_....json"])
    load_model("hub/mnist-cpu")        # the same model: the same images, bit for bit

`python -m scripts.export` is the command line. The card's YAML header is written by
huggingface_hub's ModelCardData, so the Hub reads its licence, datasets and FID.
"""
from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from config import Config, training_command
from evaluation.classifier import SHIPPED
from models.diffusion import DiffusionModel
from sampling import pretrained
from utils import hub
from utils.checkpoint import load_checkpoint
from utils.datasets import builtin_train_size
from utils.errors import UsageError
from utils.machine import describe
from utils.text import duration

# The built-in datasets as a model card names them: title, Hugging Face dataset, licence.
DATASETS = {"mnist": ("MNIST", "ylecun/mnist", "CC BY-SA 3.0"),
            "fashion-mnist": ("Fashion-MNIST", "zalando-datasets/fashion_mnist", "MIT")}
PRESET_NAMES = {"cpu": "the CPU preset", "none": "the default model"}
TASK = "unconditional-image-generation"  # the Hub's pipeline tag for image generators
# Settings that name folders of the machine that trained the model: blanked in config.json.
LOCAL_PATHS = ("CHECKPOINT_DIR", "OUTPUT_DIR")


def export(checkpoint, out, evaluations=(), log=print) -> list[Path]:
    """Write `checkpoint` (a checkpoint of main.py, or "pretrained") to the folder `out`:
    its Config, its EMA weights (and autoguidance's snapshot, where it keeps one), and a
    model card citing `evaluations` (paths of `generate.py --evaluate` JSON files of this
    checkpoint). Files already in `out` are replaced, and said so. Returns the paths."""
    path = pretrained.resolve(checkpoint)
    _, config = DiffusionModel.from_checkpoint(path)  # one line for anything that cannot load
    state = load_checkpoint(path)
    scores = [read_evaluation(e, checkpoint) for e in evaluations]
    if str(checkpoint) == pretrained.NAME:
        state = {**state, **pretrained.RECORDED}
        scores = scores or [pretrained.EVALUATION]
    scores += [during_training(r) for r in state.get("evaluations", [])[-1:]]
    out = Path(out)
    taken = [p.name for p in (out / hub.CONFIG, out / hub.WEIGHTS, out / hub.GUIDE, out / hub.CARD)
             if p.is_file()]
    card = model_card(config, state, scores, str(checkpoint))
    written = hub.write_folder(out, shared_config(config), state["ema"], card,
                               guide=state.get("guide") if isinstance(state.get("guide"), dict)
                               else None, metadata={"step": state["step"]})
    if taken:
        log(f"replaced {', '.join(taken)} in {out}")
    return written


def shared_config(config: Config) -> dict:
    """The Config as config.json holds it: the folders of the training machine blanked, the
    data folder too unless it is the dataset itself (a folder of your images)."""
    blank = LOCAL_PATHS + (("DATA_DIR",) if config.DATASET != "folder" else ())
    return {**config.to_dict(), **{name: "" for name in blank}}


def read_evaluation(path, checkpoint) -> dict:
    """An --evaluate JSON of `checkpoint` (UsageError naming --eval otherwise)."""
    try:
        result = json.loads(Path(path).read_text())
    except OSError as error:
        raise UsageError(f"--eval {path}: cannot be read ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"--eval {path} is not JSON; name a file that python generate.py "
                         f"--evaluate wrote") from None
    if not isinstance(result, dict) or "fid" not in result or "num_samples" not in result:
        raise UsageError(f"--eval {path} holds no FID: name a file that python generate.py "
                         f"--evaluate wrote")
    scored = str(result.get("checkpoint", ""))
    if not _same_checkpoint(scored, str(checkpoint)):
        raise UsageError(f"--eval {path} scored {scored or 'an unnamed checkpoint'}, not "
                         f"{checkpoint}: give the evaluation of the checkpoint you export")
    if result.get("raw_weights"):
        raise UsageError(f"--eval {path} scored the raw weights; the export holds the EMA "
                         f"weights: give an evaluation without --raw-weights")
    return {**result, "source": f"python generate.py --checkpoint {checkpoint} --evaluate"
                                + _evaluation_flags(result)}


def during_training(record: dict) -> dict:
    """A run's own evaluation (--eval-every) in the form of an --evaluate result."""
    floor = {key[:-len("_floor")]: value for key, value in record.items()
             if key.endswith("_floor")}
    return {**record, "floor": floor,
            "source": f"python main.py --eval-every N, at step {record.get('step', 0):,}"}


def _same_checkpoint(a: str, b: str) -> bool:
    if a == b:
        return True
    if pretrained.NAME in (a, b):
        return False
    return Path(a).resolve() == Path(b).resolve()


def _evaluation_flags(result: dict) -> str:
    """The flags of generate.py that an evaluation used beyond the checkpoint's defaults."""
    flags = f" --num-samples {result['num_samples']}" if result["num_samples"] != 10_000 else ""
    if result.get("guidance") not in (None, 1, 1.0):
        flags += f" --guidance {result['guidance']:g}"
    return flags


def model_card(config: Config, state: dict, evaluations: list[dict], source: str) -> str:
    """README.md of an exported model: a YAML header the Hub reads, then the facts."""
    title, _, licence = DATASETS.get(config.DATASET, (None, None, None))
    name = title or f"images of {Path(config.DATA_DIR).name or config.DATA_DIR}"
    steps = int(state["step"])
    parameters = sum(t.numel() for t in state["ema"].values())
    origin = ("the model that ships with the code (`--checkpoint pretrained`)"
              if source == pretrained.NAME else f"`{source}`")
    lines = [
        "---", card_data(config, steps, evaluations, name).to_yaml(), "---", "",
        f"# {name} diffusion: {PRESET_NAMES.get(config.PRESET, config.PRESET)}, {steps:,} steps",
        "",
        f"A {'class-conditional ' if config.CONDITIONAL else ''}DDPM (Ho et al. 2020) that "
        f"draws {config.IMAGE_SIZE}x{config.IMAGE_SIZE} {name} images: a "
        f"{parameters / 1e6:.2f}M-parameter UNet predicting {config.PREDICTION}, "
        f"{config.TIMESTEPS:,} timesteps ({config.SCHEDULE_TYPE} schedule)"
        + (", with classifier-free guidance over its classes" if config.CONDITIONAL else "")
        + (f", trained without labels on {config.CLUSTERS} k-means clusters of its images as "
           f"classes (Bao et al. 2022), drawn in proportion to their sizes" if config.CLUSTERS
           else "")
        + f". Its EMA weights, exported from {origin} by `python -m scripts.export` of the "
          f"MNIST diffusion code.", "",
        "| | |", "|---|---|",
        f"| data | {_data(config, name)} |",
        f"| training | {_training(config, state)} |",
        f"| machine | {_machines(state)} |",
        f"| trains again with | `{training_command(config)}` |",
        f"| sampling default | {_sampling(config)} |",
        f"| licence | code: MIT; weights: trained on {name}"
        + (f" ({licence})" if licence else ": the licence of those images applies") + " |",
        "", "## How well it draws", "", *_scores(config, evaluations, name), "",
        "## Use", "",
        "With the MNIST diffusion code (its folder on `sys.path`):", "",
        "```python", "from generate import load_model, generate_images", "",
        'model = load_model("THIS_FOLDER")                     # offline, from the folder alone',
        'images = generate_images(model, 100, save_path="grid.png")', "```", "",
        "or `python generate.py --checkpoint THIS_FOLDER`. The weights alone, no pickle: "
        '`safetensors.torch.load_file("model.safetensors")` is the state dict of '
        "`DiffusionModel.from_config(Config.from_dict(json.load(open(\"config.json\"))))`.", "",
        "## Files", "",
        "- `config.json`: the model's Config (every setting of the run; its folders blanked)",
        f"- `model.safetensors`: the EMA weights, {len(state['ema'])} tensors, "
        f"{parameters:,} parameters",
    ]
    if isinstance(state.get("guide"), dict):
        lines.append(f"- `guide.safetensors`: the early snapshot autoguidance steers away "
                     f"from (step {state.get('guide_step', '?')})")
    return "\n".join(lines) + "\n"


def card_data(config: Config, steps: int, evaluations: list[dict], name: str) -> ModelCardData:
    """The card's metadata as the Hub reads it: licence, dataset, tags, and each FID as a
    `model-index` result."""
    _, hub_id, licence = DATASETS.get(config.DATASET, (None, None, None))
    return ModelCardData(
        license="mit" if licence else None, datasets=[hub_id] if hub_id else None,
        pipeline_tag=TASK,
        tags=["diffusion", "ddpm", "pytorch", *([config.DATASET] if hub_id else [])]
        + (["class-conditional"] if config.CONDITIONAL else []),
        model_name=f"{config.DATASET}-diffusion-{config.PRESET}-{steps}-steps"
        if evaluations else None,
        eval_results=[EvalResult(
            task_type=TASK, dataset_type=hub_id or "imagefolder", dataset_name=name,
            dataset_split="test", metric_type="fid", metric_value=round(e["fid"], 3),
            metric_name=f"FID, {e['num_samples']:,} samples, {e.get('sampler', '')} "
                        f"({name} classifier features)") for e in evaluations] or None)


def _data(config: Config, name: str) -> str:
    count = config.TRAIN_SIZE or builtin_train_size(config.DATASET)
    text = f"{name}" + (f", {'the first ' if config.TRAIN_SIZE else ''}{count:,} training "
                        f"images" if count else "")
    if config.CONDITIONAL:
        text += f"; classes {', '.join(config.class_names)}"
    elif config.CLUSTERS:
        text += f"; no labels used: {config.CLUSTERS} k-means clusters of the images as classes"
    return text


def _training(config: Config, state: dict) -> str:
    """Steps, batch, epochs and seed; the time spent training, where recorded."""
    steps = int(state["step"])
    images = config.TRAIN_SIZE or builtin_train_size(config.DATASET)
    epochs = (f"{steps * config.BATCH_SIZE / images:.1f}" if images
              else f"{int(state.get('epoch', 0))}")  # a folder: the epochs completed
    text = f"{steps:,} steps of batch {config.BATCH_SIZE} ({epochs} epochs), seed {config.SEED}"
    if state.get("elapsed"):
        text += f"; {duration(float(state['elapsed']))} of training"
    return text


def _machines(state: dict) -> str:
    """Where it trained: the machine, or each machine from the step it took over."""
    machines = state.get("machines") or []
    if not machines:
        return "not recorded (a checkpoint of an earlier version)"
    return "; then ".join(describe(m) + (f", from step {m['step']:,}" if k else "")
                          for k, m in enumerate(machines))


def _sampling(config: Config) -> str:
    steps = config.TIMESTEPS if config.SAMPLER == "ddpm" else config.SAMPLING_STEPS
    text = f"{config.SAMPLER}, {steps} steps" + (f", eta {config.ETA:g}"
                                                 if config.SAMPLER != "ddpm" else "")
    return text + (f", guidance {config.GUIDANCE:g}" if config.CONDITIONAL else "")


def _scores(config: Config, evaluations: list[dict], name: str) -> list[str]:
    """The evaluations as a table, and what their FID means."""
    if not evaluations:
        return ["Not evaluated at export: `python generate.py --checkpoint THIS_FOLDER "
                "--evaluate` scores it (FID on 10,000 samples), and `python -m scripts.export "
                "--eval FILE` puts the result here."]
    rows = ["| samples | sampler | FID (floor) | classified with p > 0.9 (floor) "
            "| the class asked for (floor) | scored by |", "|---|---|---|---|---|---|"]
    for e in evaluations:
        floor = e.get("floor") or {}
        rows.append(f"| {e['num_samples']:,} | {e.get('sampler', '?')}"
                    + (f", guidance {e['guidance']:g}" if "guidance" in e else "")
                    + f" | {_with_floor(e.get('fid'), floor.get('fid'), '.2f')} "
                    f"| {_with_floor(e.get('confident_fraction'), floor.get('confident_fraction'), '.1%')} "
                    f"| {_with_floor(e.get('conditional_accuracy'), floor.get('conditional_accuracy'), '.1%')} "
                    f"| `{e.get('source', '')}` |")
    shipped = SHIPPED.get(config.DATASET)
    evaluator = (f"the {name} classifier that ships with the code "
                 f"(`evaluation/weights/{shipped.file}`, SHA-256 {shipped.sha256[:12]}...)"
                 if shipped else "a classifier trained on the folder's own images (cached by "
                                 "their content)")
    return rows + ["", f"FID in the 128-dimensional feature space of {evaluator}, not "
                       f"Inception's, against the test images; the floor is the FID of as many "
                       f"real training images, the best a model can score at that count. "
                       f"Numbers from other code are not comparable."]


def _with_floor(value, floor, fmt: str) -> str:
    if value is None:
        return ""
    return format(value, fmt) + (f" ({format(floor, fmt)})" if floor is not None else "")

