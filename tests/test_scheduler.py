"""Layers 1-2: the schedule's closed forms and the statistics of q(x_t | x_0)."""
import math

import pytest
import torch

from utils.noise_scheduler import NoiseScheduler, extract


@pytest.fixture(scope="module")
def linear():
    return NoiseScheduler(1000, 1e-4, 0.02, "linear")


@pytest.fixture(scope="module")
def cosine():
    return NoiseScheduler(1000, schedule_type="cosine")


def test_linear_endpoints(linear):
    assert linear.betas.shape == (1000,)
    assert linear.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert linear.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    steps = linear.betas[1:] - linear.betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), atol=1e-8)


def test_cosine_matches_improved_ddpm_formula(cosine):
    s, T = 0.008, 1000

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 1, 10, 100, 500, 900, 990):
        assert cosine.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4, abs=1e-7)
    assert cosine.betas.max().item() <= 0.999 + 1e-6


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name):
    abar = NoiseScheduler(1000, schedule_type=name).alphas_cumprod.double()
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_tables_are_computed_in_float64_then_cast(linear):
    exact = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    assert linear.alphas_cumprod.dtype == torch.float32
    assert torch.allclose(linear.alphas_cumprod.double(), exact, rtol=1e-6, atol=0)


def test_posterior_variance_and_coefficients_match_formulas(linear):
    b = linear.betas.double()
    a = 1 - b
    abar = torch.cumprod(a, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    expected_var = b * (1 - abar_prev) / (1 - abar)
    assert torch.allclose(linear.posterior_variance.double(), expected_var, rtol=1e-5, atol=1e-12)
    assert linear.posterior_variance[0].item() == 0.0  # t = 0: x_{-1} is the data itself
    assert torch.allclose(linear.posterior_mean_coef1.double(), b * abar_prev.sqrt() / (1 - abar),
                          rtol=1e-5)
    assert torch.allclose(linear.posterior_mean_coef2.double(),
                          (1 - abar_prev) * a.sqrt() / (1 - abar), rtol=1e-5)
    # at t = 0 the posterior mean is x0 itself
    assert linear.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert linear.posterior_mean_coef2[0].item() == pytest.approx(0.0, abs=1e-7)


def test_timesteps_are_zero_indexed(linear):
    t = linear.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0))
    assert t.min().item() == 0 and t.max().item() == 999
    # alpha_bar(-1) is the clean data
    assert linear.alpha_bar(torch.tensor([-1, 0, 999])).tolist() == pytest.approx(
        [1.0, linear.alphas_cumprod[0].item(), linear.alphas_cumprod[999].item()])


def test_extract_broadcasts(linear):
    t = torch.tensor([0, 5, 999])
    out = extract(linear.betas, t, (3, 1, 28, 28))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == pytest.approx(linear.betas[t].tolist())


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'; expected one of linear, cosine"):
        NoiseScheduler(10, schedule_type="quadratic")


@pytest.mark.parametrize("t", [0, 250, 999])
def test_add_noise_statistics(linear, t):
    x0 = torch.full((1, 1, 1, 1), 0.7).expand(20000, 1, 4, 4).contiguous()
    tt = torch.full((20000,), t)
    xt, noise = linear.add_noise(x0, tt, generator=torch.Generator().manual_seed(1))
    abar = linear.alphas_cumprod[t].item()
    n = xt.numel()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=4 * math.sqrt((1 - abar) / n) + 1e-6)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03, abs=1e-6)
    # and the returned noise is the noise that was used
    assert torch.allclose(xt, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise, atol=1e-5)


def test_conversions_round_trip(linear):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    xt, _ = linear.add_noise(x0, t, eps)
    assert torch.allclose(linear.predict_x0_from_eps(xt, t, eps), x0, atol=1e-3)
    assert torch.allclose(linear.predict_eps_from_x0(xt, t, x0)[1:], eps[1:], atol=1e-3)
    v = linear.get_velocity(x0, eps, t)
    assert torch.allclose(linear.predict_x0_from_v(xt, t, v), x0, atol=1e-4)
    x0_hat, eps_hat = linear.split_model_output(xt, t, v, "v", clip_x0=False)
    assert torch.allclose(x0_hat, x0, atol=1e-4)


def test_min_snr_weights(linear):
    t = torch.tensor([0, 500, 999])
    w = linear.loss_weight(t, "eps", "min-snr", gamma=5.0)
    snr = linear.snr[t]
    assert torch.allclose(w, snr.clamp(max=5.0) / snr)
    assert w[0].item() < 1e-2 and w[2].item() == pytest.approx(1.0)


def test_edm_preconditioning(linear):
    """EDM's c_skip, c_out and c_in (Karras et al. 2022, Table 1) on the VP schedule: the
    exact target gives back x0, the network sees unit variance, and sigma_data = 1 would
    be v-prediction (F = -v)."""
    from utils.noise_scheduler import EDM_SIGMA_DATA

    g = torch.Generator().manual_seed(0)
    x0 = EDM_SIGMA_DATA * torch.randn(4096, 1, 2, 2, generator=g)  # zero mean, std sigma_data
    noise = torch.randn(x0.shape, generator=g)
    for t in (0, 100, 400, 700, 999):
        tt = torch.full((x0.shape[0],), t)
        xt, _ = linear.add_noise(x0, tt, noise)
        target = linear.training_target(x0, noise, tt, "edm")
        back, eps = linear.split_model_output(xt, tt, target, "edm", clip_x0=False)
        torch.testing.assert_close(back, x0, atol=2e-3, rtol=1e-3)
        assert linear.network_input(xt, tt, "edm").std().item() == pytest.approx(1.0, abs=0.05)
        assert target.std().item() == pytest.approx(1.0, abs=0.05)  # a unit-variance target
    sigma = math.exp(linear.log_sigmas[500].item())
    c_out = sigma * EDM_SIGMA_DATA / math.sqrt(sigma ** 2 + EDM_SIGMA_DATA ** 2)
    assert linear.edm_c_out[500].item() == pytest.approx(c_out, rel=1e-5)


def test_sigmoid_weighting_integrates_sigmoid_over_log_snr(linear):
    """Kingma & Gao's weighting: summed over the timesteps whose log-SNR lies in [l1, l2],
    the weights are the integral of sigmoid(b - lambda) over it (their share of the whole)."""
    from utils.noise_scheduler import SIGMOID_BIAS

    t = torch.arange(1000)
    weights = linear.loss_weight(t, "eps", "sigmoid").double()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6)
    lam = torch.log(linear.snr.double())

    def integral(l1, l2):  # of sigmoid(b - lambda) d lambda = softplus(b - l1) - softplus(b - l2)
        return (torch.nn.functional.softplus(torch.tensor(SIGMOID_BIAS - l1, dtype=torch.float64))
                - torch.nn.functional.softplus(torch.tensor(SIGMOID_BIAS - l2, dtype=torch.float64))).item()

    whole = integral(lam.min().item(), lam.max().item())
    for l1, l2 in ((-5.0, 0.0), (0.0, 3.0), (-8.0, 6.0)):
        inside = (lam >= l1) & (lam < l2)
        assert weights[inside].sum().item() / weights.sum().item() == \
            pytest.approx(integral(l1, l2) / whole, rel=0.02)
    # the v error is the eps error / sqrt(abar): its weight carries abar
    torch.testing.assert_close(linear.loss_weight(t, "v", "sigmoid"),
                               linear.loss_weight(t, "eps", "sigmoid") * linear.alphas_cumprod)
    with pytest.raises(ValueError, match="edm has its own"):
        linear.loss_weight(t, "edm", "sigmoid")
