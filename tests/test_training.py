"""Layer 4: checkpoints and the training loop (round trips, exact resume, faults)."""
import math
from pathlib import Path

import pytest
import torch

from config import Config, ConfigError, config_for_resume
from helpers import assert_same_weights, quiet, stop_by_signal_after, train
from models import DiffusionModel
from training.trainer import Trainer, TrainingDiverged, TrainingInterrupted
from utils import checkpoint as ckpt
from utils.data_loader import DataLoaderBatcher, InMemoryBatcher


def test_batcher_yields_every_image_once_per_epoch_in_seeded_order():
    images = torch.arange(100, dtype=torch.uint8).reshape(100, 1, 1).expand(100, 2, 2).contiguous()
    batcher = InMemoryBatcher(images, batch_size=32, seed=3)
    assert len(batcher) == 4

    def epoch_values(b, epoch, start=0):
        values = [x[:, 0, 0, 0] for x in b.batches(epoch, start)]
        return torch.cat(values)

    first = epoch_values(batcher, 0)
    as_pixels = ((first + 1) * 127.5).round().long()
    assert sorted(as_pixels.tolist()) == list(range(100))  # each image exactly once
    assert as_pixels.tolist() != list(range(100))  # shuffled
    assert torch.equal(first, epoch_values(InMemoryBatcher(images, 32, seed=3), 0))  # seeded
    assert not torch.equal(first, epoch_values(batcher, 1))  # a new order each epoch
    assert not torch.equal(first, epoch_values(InMemoryBatcher(images, 32, seed=4), 0))
    assert torch.equal(first[64:], epoch_values(batcher, 0, start=2))  # resumable mid-epoch


def test_dataloader_pipeline_gives_the_same_batches(mnist):
    images, labels = mnist.load("train")
    fast = InMemoryBatcher(images[:100], batch_size=32, seed=5)
    classic = DataLoaderBatcher(images[:100], labels[:100], batch_size=32, seed=5)
    assert len(fast) == len(classic) == 4
    for epoch, start in [(0, 0), (1, 2)]:
        for a, b in zip(fast.batches(epoch, start), classic.batches(epoch, start), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("conditional", [False, True])
def test_the_dataloader_trains_models_with_and_without_classes(tiny, conditional):
    """--loader dataloader yields labels either way; a model without classes ignores them."""
    trainer = Trainer(tiny(LOADER="dataloader", MAX_STEPS=2, CONDITIONAL=conditional),
                      progress=False, log=lambda *a: None)
    trainer.fit()
    assert trainer.step == 2 and all(math.isfinite(loss) for loss in trainer.losses)


def test_cuda_random_states_restore_on_a_machine_with_fewer_gpus(monkeypatch):
    """A checkpoint from an 8-GPU machine resumes on one GPU: the states that exist are set."""
    from utils import seeding

    state = seeding.capture_rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    seeding.restore_rng_state(state)
    assert restored == [(0, 0)]


def test_config_round_trip_and_validation(tmp_path):
    config = Config(MODEL_CHANNELS=8, CHANNEL_MULT=(1, 2), DEVICE="cpu")
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="--epochs must be positive, got 0"):
        Config(EPOCHS=0, DEVICE="cpu").validate()
    with pytest.raises(ConfigError, match="--beta-start .* must be smaller than --beta-end"):
        Config(BETA_START=0.03, DEVICE="cpu").validate()
    with pytest.raises(ConfigError, match="unknown --schedule 'quadratic'"):
        Config(SCHEDULE_TYPE="quadratic", DEVICE="cpu").validate()
    with pytest.raises(dataclasses_frozen_error()):
        config.EPOCHS = 3


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_checkpoint_round_trip_gives_identical_outputs(tiny):
    config = tiny(MAX_STEPS=3)
    trainer = train(config)
    path = trainer.checkpoint_dir / ckpt.LATEST
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["config"]["MODEL_CHANNELS"] == 8 and raw["step"] == 3
    assert set(raw) >= {"model", "ema", "optimizer", "losses", "config", "step", "epoch"}
    model, loaded_config = DiffusionModel.from_checkpoint(path)
    recorded = config.replace(CLASS_NAMES=tuple("0123456789"),
                              DATA_FINGERPRINT=trainer.dataset.fingerprint)
    assert len(trainer.dataset.fingerprint) == 64  # the run records what it trained on
    assert loaded_config == trainer.config == recorded
    assert model.config == loaded_config  # the model carries its config
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t), trainer.ema.unet(x, t))
    a = model.sample((2, 1, 28, 28), sampler="dpm-solver", steps=5, seed=1)
    b = trainer.ema.sample((2, 1, 28, 28), sampler="dpm-solver", steps=5, seed=1)
    assert torch.equal(a, b)
    raw_model, _ = DiffusionModel.from_checkpoint(path, ema=False)
    trainer.model.eval()  # no dropout
    with torch.no_grad():
        assert torch.equal(raw_model.unet(x, t), trainer.model.unet(x, t))
        assert not torch.equal(raw_model.unet(x, t), model.unet(x, t))


RESUME_CASES = {  # settings, total steps, where the first run stops (4 steps per epoch)
    "mid-epoch": (dict(), 9, 3),
    "at-epoch-end": (dict(), 9, 4),
    "in-epoch-2": (dict(), 9, 6),
    "decaying-power-ema-by-signal": (dict(LR_SCHEDULE="cosine", LR_FLOOR=0.0, EMA_RULE="power",
                                          EMA_STD=0.1, TIMESTEP_SAMPLING="lognormal",
                                          SAVE_EVERY=100), 9, -4),
    "conditional": (dict(CONDITIONAL=True, CLASS_DROPOUT=0.5, SAVE_EVERY=100), 7, 3),
    "clusters": (dict(CLUSTERS=4, CLASS_DROPOUT=0.5, SAVE_EVERY=100), 7, 3),
    # the autoguidance guide is kept at step 3 of 9 (3/8 >= 0.3): before and after the stop
    "guide-kept-before-the-stop": (dict(GUIDE_AT=0.3, LR_SCHEDULE="linear", SAVE_EVERY=100), 9, -5),
    "guide-kept-after-the-resume": (dict(GUIDE_AT=0.3, PREDICTION="edm",
                                         TIMESTEP_SAMPLING="lognormal", SAVE_EVERY=100), 9, -2),
    # the guide's own EMA (GUIDE_EMA_STD) is saved until the snapshot and goes on after it
    "guide-ema-kept-after-the-resume": (dict(GUIDE_AT=0.3, GUIDE_EMA_STD=0.2, SAVE_EVERY=100), 9, -2),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_exact(tiny, tmp_path, case):
    """N steps in one run == k steps, stop, resume, N - k steps: weights, EMA and losses
    bit for bit (same process, same shapes). A negative k stops by a signal (Ctrl-C)."""
    settings, total, stop_at = RESUME_CASES[case]
    straight = train(tiny(MAX_STEPS=total, CHECKPOINT_DIR=str(tmp_path / "a"), **settings))
    if stop_at > 0:
        train(tiny(MAX_STEPS=stop_at, CHECKPOINT_DIR=str(tmp_path / "b"), **settings))
    else:
        first = Trainer(tiny(MAX_STEPS=total, CHECKPOINT_DIR=str(tmp_path / "b"), **settings),
                        progress=False, log=quiet)
        stop_by_signal_after(first, -stop_at)
        with pytest.raises(TrainingInterrupted):
            first.fit()
    state = ckpt.load_checkpoint(tmp_path / "b" / ckpt.LATEST)
    assert state["step"] == abs(stop_at)
    config = config_for_resume(Config.from_dict(state["config"]), {"MAX_STEPS": total})
    resumed = train(config, resume=state)
    assert resumed.step == straight.step == total
    assert resumed.losses == straight.losses
    assert_same_weights(straight, resumed)
    if settings.get("GUIDE_AT"):
        assert resumed.guide_step == straight.guide_step == 3
        for name, value in straight.ema.guide.state_dict().items():
            assert torch.equal(value, resumed.ema.guide.state_dict()[name]), name
    if settings.get("CONDITIONAL") or settings.get("CLUSTERS"):
        assert straight.model.unet.class_embed.weight.abs().sum() > 0  # the embedding learned


def test_resume_refuses_a_different_model():
    saved = Config(MODEL_CHANNELS=8, DEVICE="cpu")
    with pytest.raises(ConfigError, match="--model-channels 16 does not match the checkpoint"):
        config_for_resume(saved, {"MODEL_CHANNELS": 16})
    assert config_for_resume(saved, {"EPOCHS": 7}).EPOCHS == 7


class _Payload:
    """Unpickling this would create a file: a stand-in for malicious code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "config": {}, "model": _Payload(marker), "ema": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: plain pickle would have run it
    with open(path, "rb") as f:
        try:
            torch.load(f, weights_only=False)
        except Exception:
            pass
    assert marker.exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "garbage", "not_ours", "folder"])
def test_bad_checkpoints_give_one_line_errors(tiny, tmp_path, kind):
    path = tmp_path / "bad.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind in ("truncated", "garbage"):
        trainer = train(tiny(MAX_STEPS=1))
        data = (trainer.checkpoint_dir / ckpt.LATEST).read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x00junk" * 100)
    elif kind == "not_ours":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_non_finite_loss_is_skipped_then_stops_training(tiny, monkeypatch):
    config = tiny(MAX_STEPS=40, MAX_BAD_STEPS=3, SAVE_EVERY_STEPS=2, PRINT_EVERY=1)
    trainer = Trainer(config, progress=False, log=quiet)
    original = trainer.model.compute_loss
    calls = {"n": 0}
    snapshots = {}

    def flaky_loss(x0, *args, **kwargs):
        calls["n"] += 1
        loss = original(x0, *args, **kwargs)
        if calls["n"] == 3:  # one bad step: skipped, training goes on
            snapshots["before"] = [p.detach().clone() for p in trainer.model.parameters()]
            return loss * float("nan")
        if calls["n"] >= 6:  # from step 6 on, always bad
            return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer.model, "compute_loss", flaky_loss)
    original_step = trainer.train_step

    def watched_step(*batch):
        out = original_step(*batch)
        if calls["n"] == 3:
            snapshots["after"] = [p.detach().clone() for p in trainer.model.parameters()]
        return out

    monkeypatch.setattr(trainer, "train_step", watched_step)
    with pytest.raises(TrainingDiverged, match="training stopped at step 8: 3 non-finite"):
        trainer.fit()
    for a, b in zip(snapshots["before"], snapshots["after"]):
        assert torch.equal(a, b)  # the NaN step changed no weight
    assert math.isnan(trainer.losses[2]) and math.isfinite(trainer.losses[3])
    # the last checkpoint (step 6, written after one skipped step) is intact and loads
    state = ckpt.load_checkpoint(trainer.checkpoint_dir / ckpt.LATEST)
    assert state["step"] == 6
    losses = state["losses"].tolist()
    assert [i for i, v in enumerate(losses) if not math.isfinite(v)] == [2, 5]
    for value in state["model"].values():
        assert torch.isfinite(value).all()


def test_periodic_checkpoints_are_pruned(tiny):
    trainer = train(tiny(EPOCHS=4, KEEP=2))
    names = sorted(p.name for p in trainer.checkpoint_dir.glob("*.pt"))
    assert names == ["epoch_0003.pt", "epoch_0004.pt", "latest.pt"]
    assert ckpt.find_latest(trainer.checkpoint_dir).name == "latest.pt"


def test_periodic_checkpoints_sort_by_number_not_text(tmp_path):
    """epoch_10000.pt is newer than epoch_9999.pt: kept by --keep, chosen without latest.pt."""
    for epoch in (9998, 9999, 10000):
        (tmp_path / ckpt.periodic_name(epoch)).write_bytes(b"x")
    assert ckpt.find_latest(tmp_path).name == "epoch_10000.pt"
    ckpt.prune_periodic(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_10000.pt", "epoch_9999.pt"]


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    ckpt.save_checkpoint({"config": {}, "model": {}, "ema": {}}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_training_writes_history_plots_and_grids(tiny):
    trainer = train(tiny(EPOCHS=2))
    out = trainer.config.OUTPUT_DIR
    names = {p.name for p in Path(out).iterdir()}
    assert {"config.json", "loss_history.csv", "loss.png", "samples_epoch_0001.png",
            "samples_epoch_0002.png", "samples_final.png"} <= names
    rows = (Path(out) / "loss_history.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss" and len(rows) == 1 + 8
