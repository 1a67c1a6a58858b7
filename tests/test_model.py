"""The network: shapes, the DDPM posterior step, and learning on one small batch."""
import pytest
import torch

from models import DiffusionModel, DownBlock, TimeEmbedding, UNet, UpBlock


def test_time_embedding_shape_and_values():
    emb = TimeEmbedding(32)
    out = emb(torch.tensor([0, 1, 999]))
    assert out.shape == (3, 32)
    # t = 0: cos(0) = 1 in the first half, sin(0) = 0 in the second
    assert torch.allclose(out[0, :16], torch.ones(16)) and torch.allclose(out[0, 16:], torch.zeros(16))
    assert not torch.allclose(out[1], out[2])
    assert TimeEmbedding(7)(torch.tensor([3])).shape == (1, 7)


def test_blocks_change_resolution_as_documented():
    emb = torch.randn(2, 16)
    down = DownBlock(8, 12, 16)
    skip = down(torch.randn(2, 8, 28, 28), emb)
    assert skip.shape == (2, 12, 28, 28)  # features at the same resolution
    h = down.downsample(skip)  # the UNet takes them down a resolution
    assert h.shape == (2, 12, 14, 14)
    up = UpBlock(12, 8, 16, skip_channels=12)
    assert up(h, skip, emb).shape == (2, 8, 28, 28)


@pytest.mark.parametrize("kwargs", [dict(), dict(model_channels=16, time_embed_dim=32, attention=False),
                                    dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1)])
def test_unet_output_matches_input_shape(kwargs):
    net = UNet(**kwargs)
    x = torch.randn(3, 1, 28, 28)
    assert net(x, torch.tensor([0, 10, 999])).shape == x.shape


def test_unet_rejects_bad_shapes():
    net = UNet(model_channels=8, time_embed_dim=16)
    with pytest.raises(AssertionError, match="timesteps must have shape"):
        net(torch.randn(2, 1, 28, 28), torch.tensor([1]))
    with pytest.raises(AssertionError, match="expected"):
        net(torch.randn(2, 3, 28, 28), torch.tensor([1, 2]))


def test_reverse_step_matches_posterior_mean_formula():
    model = DiffusionModel(timesteps=100, model_channels=8, time_embed_dim=16)
    sched = model.scheduler
    g = torch.Generator().manual_seed(0)
    t = 40
    x0_true = 0.8 * torch.tanh(torch.randn(4, 1, 28, 28, generator=g))
    eps = torch.randn(4, 1, 28, 28, generator=g)
    xt, _ = sched.add_noise(x0_true, torch.full((4,), t), eps)
    z = torch.randn(4, 1, 28, 28, generator=g)
    a, b, abar = sched.alphas[t].double(), sched.betas[t].double(), sched.alphas_cumprod[t].double()
    abar_prev = sched.alphas_cumprod[t - 1].double()
    # DDPM Algorithm 2, written out: 1/sqrt(a) (x_t - b / sqrt(1 - abar) eps) + sigma z
    mean = (xt.double() - b / (1 - abar).sqrt() * eps.double()) / a.sqrt()
    sigma = (b * (1 - abar_prev) / (1 - abar)).sqrt()
    model.clip_x0 = False
    out = model.reverse_diffusion_step(xt, t, eps, noise=z)
    assert torch.allclose(out.double(), mean + sigma * z.double(), atol=1e-5)
    # with clipping on, the same formula holds whenever x0 stays inside [-1, 1]
    model.clip_x0 = True
    x0 = sched.predict_x0_from_eps(xt, torch.full((4,), t), eps)
    assert x0.abs().max() < 1
    assert torch.allclose(model.reverse_diffusion_step(xt, t, eps, noise=z).double(),
                          mean + sigma * z.double(), atol=1e-5)


def test_last_reverse_step_adds_no_noise():
    model = DiffusionModel(timesteps=100, model_channels=8, time_embed_dim=16)
    xt, eps = 0.3 * torch.ones(2, 1, 28, 28), 0.01 * torch.ones(2, 1, 28, 28)
    a = model.reverse_diffusion_step(xt, 0, eps, noise=torch.zeros_like(xt))
    b = model.reverse_diffusion_step(xt, 0, eps, noise=100 * torch.ones_like(xt))
    assert torch.equal(a, b)
    # and at t = 0 the result is the predicted x0
    x0 = model.scheduler.predict_x0_from_eps(xt, torch.zeros(2, dtype=torch.long), eps)
    assert torch.allclose(a, x0, atol=1e-6)


def test_loss_falls_when_overfitting_one_batch(mnist):
    from utils.data_loader import normalize_images

    torch.manual_seed(0)
    images, _ = mnist.load("train")
    x0 = normalize_images(images[:8])
    model = DiffusionModel(timesteps=100, model_channels=8, time_embed_dim=16, num_res_blocks=1)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = model.compute_loss(x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(1.0, abs=0.15)  # zero-initialised output predicts 0 noise
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_forward_returns_output_and_noise():
    model = DiffusionModel(timesteps=10, model_channels=8, time_embed_dim=16)
    x0 = torch.zeros(2, 1, 28, 28)
    out, noise = model(x0, torch.tensor([0, 9]))
    assert out.shape == noise.shape == x0.shape
    xt, n2 = model.forward_diffusion(x0, torch.tensor([0, 9]), noise)
    assert n2 is noise
