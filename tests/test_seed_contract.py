"""The design's own API, called exactly as the design document writes it.

The design names every class and function with its signature, what it returns and its
shapes; people follow it from notebooks, courses and their own code. One test per group
calls each name as the design does (its keyword names, positional order and defaults)
and checks what the design promises. Extra keyword arguments with defaults are allowed
elsewhere; nothing here may change.

Two settings of Config have other defaults than the design's, on purpose (docs/reference.md):
DATA_DIR '' and CHECKPOINT_DIR/OUTPUT_DIR '' mean the repo's data/ and a new run folder
under runs/ (so that a run never overwrites another); the design's './data' still reads
as the repo's data/ (tested below), and NUM_SAMPLES is 100 (a grid of ten per digit).
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

import helpers


# ----- config.py -----
def test_config_has_the_designs_fields():
    from config import Config

    config = Config()
    expected = dict(BATCH_SIZE=128, IMAGE_SIZE=28, CHANNELS=1, MODEL_CHANNELS=64,
                    TIME_EMBED_DIM=256, TIMESTEPS=1000, BETA_START=1e-4, BETA_END=0.02,
                    EPOCHS=100, LEARNING_RATE=1e-4, SAVE_EVERY=10, PRINT_EVERY=100)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert config.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("DATA_DIR", "CHECKPOINT_DIR", "OUTPUT_DIR", "NUM_SAMPLES"):
        assert hasattr(config, name)
    # the design's data folder reads as the repo's own data/ (works from any folder)
    assert Config.from_dict({"DATA_DIR": "./data"}).DATA_DIR == ""


# ----- models/unet.py -----
def test_unet_blocks_as_designed():
    from models.unet import DownBlock, TimeEmbedding, UNet, UpBlock

    emb = TimeEmbedding(32)(torch.tensor([0, 500, 999]))
    assert emb.shape == (3, 32)

    time_emb = torch.randn(2, 256)
    down = DownBlock(1, 64, 256)
    features = down(torch.randn(2, 1, 28, 28), time_emb)
    assert torch.is_tensor(features) and features.shape == (2, 64, 28, 28)
    down = DownBlock(in_channels=64, out_channels=128, time_embed_dim=256)
    features = down(torch.randn(2, 64, 14, 14), time_emb)
    assert torch.is_tensor(features) and features.shape == (2, 128, 14, 14)

    up = UpBlock(128, 64, 256)
    out = up(torch.randn(2, 128, 7, 7), torch.randn(2, 64, 14, 14), time_emb)
    assert torch.is_tensor(out) and out.shape == (2, 64, 14, 14)
    up = UpBlock(in_channels=64, out_channels=32, time_embed_dim=256)
    assert up(torch.randn(2, 64, 14, 14), torch.randn(2, 32, 28, 28), time_emb).shape \
        == (2, 32, 28, 28)

    net = UNet(in_channels=1, model_channels=64, time_embed_dim=256)
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.tensor([3, 999])).shape == x.shape
    defaults = inspect.signature(UNet).parameters
    assert [defaults[k].default for k in ("in_channels", "model_channels", "time_embed_dim")] \
        == [1, 64, 256]


# ----- models/diffusion.py -----
def test_diffusion_model_as_designed():
    from models.diffusion import DiffusionModel

    model = DiffusionModel(50, 1e-4, 0.02, 1, 8, 16)  # timesteps .. time_embed_dim, in order
    assert model.timesteps == 50
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    t = torch.tensor([0, 20, 49])
    xt, noise = model.forward_diffusion(x0, t)
    assert xt.shape == noise.shape == x0.shape
    xt2, noise2 = model.forward_diffusion(x0, t, noise=noise)
    assert torch.equal(noise2, noise) and torch.allclose(xt2, xt)
    predicted, noise = model(x0, t)  # forward(x0, t) -> (predicted noise, noise)
    assert predicted.shape == noise.shape == x0.shape
    previous = model.reverse_diffusion_step(xt, t, predicted)
    assert previous.shape == x0.shape
    loss = model.compute_loss(x0, t)
    assert loss.dim() == 0 and loss.item() >= 0
    loss.backward()
    images = model.sample((2, 1, 28, 28), "cpu")  # the full ancestral chain, every step
    assert images.shape == (2, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    steps = []
    model.sample((1, 1, 28, 28), "cpu", callback=lambda i, t, x, x0: steps.append(t))
    assert steps == list(range(49, -1, -1))


# ----- utils/data_loader.py -----
def test_data_loader_as_designed(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader

    from utils.data_loader import denormalize_images, get_mnist_dataloader, normalize_images

    monkeypatch.chdir(tmp_path)  # "./data" is the repo's data/ from any folder
    loader = get_mnist_dataloader(data_dir="./data", batch_size=128, train=True, download=True)
    assert isinstance(loader, DataLoader) and len(loader.dataset) == 60_000
    images, labels = next(iter(loader))
    assert images.shape == (128, 1, 28, 28) and labels.shape == (128,)
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1
    test = get_mnist_dataloader(str(helpers.DATA_DIR), 64, False, False)
    assert len(test.dataset) == 10_000
    first, _ = next(iter(test))
    assert torch.equal(first, next(iter(test))[0])  # the test split in order, not shuffled

    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(normalize_images(x), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(denormalize_images(normalize_images(x)), x)


# ----- utils/noise_scheduler.py -----
def test_noise_scheduler_as_designed():
    from utils.noise_scheduler import NoiseScheduler

    linear = NoiseScheduler(1000, 1e-4, 0.02, "linear")
    assert linear.betas[0].item() == pytest.approx(1e-4) and \
        linear.betas[-1].item() == pytest.approx(0.02)
    cosine = NoiseScheduler(timesteps=1000, beta_start=1e-4, beta_end=0.02,
                            schedule_type="cosine")
    betas = cosine._cosine_beta_schedule(s=0.008)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas <= 0.999).all()
    t = linear.sample_timesteps(256, "cpu")
    assert t.shape == (256,) and t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 999
    x0 = torch.zeros(4, 1, 28, 28)
    xt, noise = linear.add_noise(x0, torch.full((4,), 999))
    assert xt.shape == noise.shape == x0.shape
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseScheduler(1000, 1e-4, 0.02, "quadratic")


# ----- utils/visualization.py -----
def test_visualization_as_designed(tmp_path):
    from models.diffusion import DiffusionModel
    from utils.visualization import (plot_images, plot_loss, save_images,
                                     visualize_diffusion_process)

    images = torch.rand(16, 1, 28, 28) * 2 - 1
    path = save_images(images, tmp_path / "grid.png", 4, True)
    assert path.stat().st_size > 0
    plot_images(images, title="samples", nrow=4, figsize=(10, 10), normalize=True)
    plot_images(images, "samples", 4, (5, 5), True, save_path=tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    plot_loss([1.0, 0.5, 0.25], tmp_path / "loss.png", "loss")
    assert (tmp_path / "loss.png").stat().st_size > 0
    model = DiffusionModel(timesteps=1000, model_channels=8, time_embed_dim=16)
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    shown = visualize_diffusion_process(model, x0)  # timesteps_to_show=[0, 100, ..., 999]
    assert shown.shape == (2 * 7, 1, 28, 28)  # each image, then its six noise levels
    assert inspect.signature(visualize_diffusion_process).parameters[
        "timesteps_to_show"].default == (0, 100, 300, 500, 700, 999)


# ----- main.py and generate.py -----
@pytest.mark.slow
def test_scripts_functions_as_designed(tmp_path, tiny):
    import generate
    import main

    model, losses = main.train_model(tiny(MAX_STEPS=3), progress=False, log=helpers.quiet)
    assert len(losses) == 3 and hasattr(model, "sample")
    assert main.main([*helpers.TINY_FLAGS, "--max-steps", "2",
                      "--checkpoint-dir", str(tmp_path / "run")]) == 0
    checkpoint = tmp_path / "run" / "latest.pt"
    model = generate.load_model(str(checkpoint), "cpu")
    images = generate.generate_images(model, 4, "cpu", save_path=str(tmp_path / "g.png"),
                                      show_images=True)
    assert images.shape == (4, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert (tmp_path / "g.png").stat().st_size > 0
    strip = generate.generate_interpolation(model, 5, "cpu", save_path=str(tmp_path / "i.png"))
    assert strip.shape == (1, 5, 1, 28, 28) and (tmp_path / "i.png").stat().st_size > 0
    assert generate.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "m.png"),
                          "--quiet", "--num-samples", "4"]) == 0
    for name, params in ((generate.load_model, ["checkpoint_path", "device"]),
                         (generate.generate_images,
                          ["model", "num_samples", "device", "save_path", "show_images"]),
                         (generate.generate_interpolation,
                          ["model", "num_steps", "device", "save_path"])):
        assert list(inspect.signature(name).parameters)[:len(params)] == params
