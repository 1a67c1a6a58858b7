"""--log tensorboard: the run's events read back with TensorBoard's own reader (every tag,
every step), resumed runs append without repeating a step, the TensorBoard server on the
loopback address serves a scalar, and a run without the option writes no event files."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import train
from utils import checkpoint as ckpt

SCALARS = {"loss", "lr", "ema_decay", "grad_norm", "images_per_s", "skipped_steps", "loss_q0",
           "loss_q1", "loss_q2", "loss_q3", "eval/fid", "eval/fid_floor",
           "eval/confident_fraction", "eval/confident_fraction_floor", "eval/class_kl",
           "eval/conditional_accuracy", "eval/conditional_accuracy_floor", "eval/recall",
           "eval/recall_floor", "eval/precision"}


def _events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, data_dir, quick_evaluator):
    from helpers import tiny_config

    tmp = tmp_path_factory.mktemp("tb")
    config = tiny_config(tmp, data_dir, LOG="tensorboard", EPOCHS=2, EVAL_EVERY=1,
                         EVAL_SAMPLES=10, CONDITIONAL=True, NUM_SAMPLES=10)
    trainer = train(config, evaluator=quick_evaluator)
    return config, trainer


def test_every_diagnostic_is_logged_at_its_steps(logged_run):
    config, trainer = logged_run
    events = _events(f"{config.OUTPUT_DIR}/tb")
    tags = events.Tags()
    assert SCALARS <= set(tags["scalars"]), SCALARS - set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8]  # every PRINT_EVERY steps
    assert [e.step for e in events.Scalars("eval/fid")] == [4, 8]  # each epoch's evaluation
    fid = [e.value for e in events.Scalars("eval/fid")]
    assert fid == pytest.approx([e["fid"] for e in trainer.evaluations])
    lrs = [e.value for e in events.Scalars("lr")]
    assert lrs[-1] == pytest.approx(trainer.lr_at(7))
    assert "samples" in tags["images"] and [e.step for e in events.Images("samples")] == [4, 8]
    strips = events.Images("guidance_strip")  # a conditional run: classes x guidance scales
    assert [e.step for e in strips] == [4, 8]
    side = config.IMAGE_SIZE + 2  # make_grid's padding of 2
    assert (strips[-1].width, strips[-1].height) == (4 * side + 2, 10 * side + 2)
    assert "config/text_summary" in tags["tensors"]
    hparams = _events(f"{config.OUTPUT_DIR}/tb/hparams")
    assert "final/fid" in hparams.Tags()["scalars"]


def test_a_resumed_run_appends_without_repeating_a_step(tmp_path, tiny, quick_evaluator):
    config = tiny(LOG="tensorboard", EPOCHS=2, SAVE_EVERY=1)
    first = train(config)  # logged steps 2 .. 8; epoch_0001.pt holds step 4
    folder = first.checkpoint_dir
    # as if the process died after logging step 8 but before saving it: latest.pt is at 4
    shutil.copy(folder / "epoch_0001.pt", folder / ckpt.LATEST)
    state = ckpt.load_checkpoint(folder / ckpt.LATEST)
    from config import Config, config_for_resume

    train(config_for_resume(Config.from_dict(state["config"]), {"EPOCHS": 3}), resume=state)
    steps = [e.step for e in _events(tmp_path / "out" / "tb").Scalars("loss")]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]


def test_a_run_without_the_option_writes_no_event_files(tiny):
    trainer = train(tiny(MAX_STEPS=2))
    assert not list(trainer.checkpoint_dir.parent.rglob("events.out.tfevents*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_tensorboard_server_serves_a_scalar_over_http(logged_run):
    config, _ = logged_run
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                               config.OUTPUT_DIR, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tb&tag=loss"
    try:
        deadline, rows = time.time() + 60, None
        while time.time() < deadline and not rows:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    rows = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert rows and [step for _, step, _ in rows] == [2, 4, 6, 8], rows
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_run_ends_with_its_tensorboard_command(tiny):
    from training.trainer import Trainer

    lines = []
    config = tiny(LOG="tensorboard", MAX_STEPS=2)
    Trainer(config, progress=False, log=lines.append).fit()
    assert any(f"tensorboard --logdir {config.OUTPUT_DIR}/tb" in line for line in lines)
