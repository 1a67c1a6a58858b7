"""A model as a folder in the Hugging Face layout, the form in which models are shared:

    config.json         the model's Config (`Config.to_dict`), as JSON
    model.safetensors   its weights (the EMA of a run): the DiffusionModel's state dict
    guide.safetensors   autoguidance's early snapshot (--guide-at), where the run kept one
    README.md           the model card (written by sampling/export.py)

safetensors files hold tensors and a small JSON header, no pickle, so nothing in them can
run; `safetensors.torch.load_file(".../model.safetensors")` opens the weights on their own.
`write_folder` writes the files (each atomically, utils/files.py); `read_folder` reads them
back as a checkpoint's state (`config`, `ema`, `step`, and `guide` where there is one), which
`DiffusionModel.from_checkpoint` takes like a checkpoint file's. A missing, truncated or
corrupt file, or non-finite weights, is one CheckpointError line naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from utils.checkpoint import LATEST, CheckpointError, non_finite
from utils.errors import UsageError
from utils.files import atomic_write, save_text

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
GUIDE = "guide.safetensors"
CARD = "README.md"


def write_folder(folder, config: dict, weights: dict, card: str, guide: dict | None = None,
                 metadata: dict | None = None) -> list[Path]:
    """Write a model folder: `config` (plain values) as config.json, `weights` (and the
    `guide`'s, else any old guide.safetensors is removed) as safetensors with `metadata`
    (strings) in their headers, and `card` as README.md. Returns the paths written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; name a folder to export into")
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    written = [save_text(json.dumps(config, indent=2) + "\n", folder / CONFIG),
               _save_weights(weights, folder / WEIGHTS, {**header, "weights": "ema"})]
    if guide is not None:
        written.append(_save_weights(guide, folder / GUIDE, {**header, "weights": "guide"}))
    else:
        (folder / GUIDE).unlink(missing_ok=True)  # an earlier export's: not this model's guide
    written.append(save_text(card, folder / CARD))
    return written


def _save_weights(weights: dict, path: Path, metadata: dict) -> Path:
    tensors = {name: value.detach().cpu().contiguous() for name, value in weights.items()}
    data = save_tensors(tensors, metadata=metadata)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_folder(folder) -> dict:
    """A model folder as a checkpoint's state: {'config', 'ema', 'step', 'metadata'} and
    'guide' where guide.safetensors exists. CheckpointError (one line) otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        hint = (f"; for a run's folder name its checkpoint, {folder / LATEST}"
                if (folder / LATEST).is_file() else "")
        raise CheckpointError(f"{folder} is a folder without {' and '.join(missing)}: a model "
                              f"folder holds {CONFIG} and {WEIGHTS} (python -m scripts.export "
                              f"writes one){hint}")
    config = read_config(folder / CONFIG)
    weights, metadata = read_weights(folder / WEIGHTS)
    state = {"config": config, "ema": weights, "metadata": metadata,
             "step": int(metadata["step"]) if metadata.get("step", "").isdigit() else None}
    if (folder / GUIDE).is_file():
        state["guide"], _ = read_weights(folder / GUIDE)
    return state


def read_config(path: Path) -> dict:
    """config.json as a dict of settings; CheckpointError if it is not one."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); "
                              f"it is the model's Config as written by Config.to_dict") from None
    if not isinstance(config, dict) or not config:
        raise CheckpointError(f"{path} holds no settings (expected a JSON object of the "
                              f"Config's fields, such as \"MODEL_CHANNELS\")")
    return config


def read_weights(path: Path) -> tuple[dict, dict]:
    """A safetensors file's tensors and header metadata; CheckpointError if it is empty,
    truncated, corrupt or holds non-finite weights."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as error:
        reason = str(error).split(": ", 1)[-1].strip()
        raise CheckpointError(f"{path} is truncated or corrupt (safetensors: {reason})") from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from None
    bad = non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{path} holds non-finite weights ({bad}); it cannot draw "
                              f"anything: export an earlier checkpoint of the run")
    return tensors, metadata
