"""The noise schedule: the one place where the diffusion tables are computed.

betas -> alphas -> cumulative products -> posterior coefficients are derived here,
once, in float64, then stored as float32 buffers. Everything else (training loss,
samplers, inversion) reads these tables through `extract` and the closed-form
helpers below; no other module re-derives a formula from betas.

Notation follows Ho et al. 2020 (DDPM), with timesteps 0-indexed: t = 0 .. T-1,
where table index t holds the paper's step t+1. `alpha_bar(-1) = 1` is the clean data.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

SCHEDULES = ("linear", "cosine")
TIMESTEP_DISTRIBUTIONS = ("uniform", "lognormal")
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
EDM_SIGMA_DATA = 0.5  # EDM's sigma_data for images in [-1, 1] (Karras et al. 2022, Table 1)
SIGMOID_BIAS = 2.0  # b of the sigmoid weighting sigmoid(b - lambda) (Kingma & Gao 2023)
PREDICTIONS = ("eps", "v", "edm")
WEIGHTINGS = ("none", "min-snr", "sigmoid")


def extract(table: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """table[t] reshaped to broadcast against a batch of `shape`: (B,) -> (B, 1, 1, 1)."""
    out = table.gather(0, t.to(table.device).long())
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


class NoiseScheduler(nn.Module):
    """Beta schedule and the closed forms of q(x_t | x_0) and q(x_{t-1} | x_t, x_0).

    Args:
        timesteps: number of diffusion steps T.
        beta_start, beta_end: endpoints of the linear schedule (unused by cosine).
        schedule_type: 'linear' (DDPM) or 'cosine' (Nichol & Dhariwal 2021).

    All tables are (T,) float32 buffers that follow the module to its device.
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 schedule_type: Literal["linear", "cosine"] = "linear"):
        super().__init__()
        self.timesteps = int(timesteps)
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.schedule_type = schedule_type
        if schedule_type == "linear":
            betas = self._linear_beta_schedule()
        elif schedule_type == "cosine":
            betas = self._cosine_beta_schedule()
        else:
            raise ValueError(f"unknown schedule {schedule_type!r}; expected one of "
                             f"{', '.join(SCHEDULES)}")

        # float64 for accuracy, as in improved-diffusion; cast once at the end.
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eqs. (6)-(7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # posterior_variance[0] is 0: clip the log to the next value (improved-diffusion).
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt()
            / (1.0 - alphas_cumprod),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
            # sigma_t = sqrt((1 - abar_t) / abar_t), the noise level of x_t / sqrt(abar_t)
            # (EDM's sigma of this VP schedule); log sigma increases with t.
            "log_sigmas": 0.5 * torch.log((1.0 - alphas_cumprod) / alphas_cumprod),
            **self._edm_tables(alphas_cumprod),
            **self._sigmoid_weights(alphas_cumprod),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)
        # alpha_bar with the clean level in front, so that index t + 1 serves t = -1 .. T-1.
        self.register_buffer("alphas_cumprod_padded",
                             torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod]).float(),
                             persistent=False)

    # ----- schedules (float64) -----
    def _linear_beta_schedule(self) -> torch.Tensor:
        """DDPM's linear schedule from beta_start to beta_end."""
        return torch.linspace(self.beta_start, self.beta_end, self.timesteps, dtype=torch.float64)

    def _cosine_beta_schedule(self, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
        """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t) / f(0),
        f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2, betas clipped at max_beta."""
        steps = torch.arange(self.timesteps + 1, dtype=torch.float64)
        f = torch.cos(((steps / self.timesteps) + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        return betas.clamp(max=max_beta)

    @staticmethod
    def _edm_tables(alphas_cumprod: torch.Tensor) -> dict:
        """EDM's preconditioning (Karras et al. 2022, Table 1) on this VP schedule. With
        sigma_t = sqrt((1 - abar) / abar), x_t / sqrt(abar) = x_0 + sigma_t eps is EDM's noisy
        image; the network F sees c_in times it, and the denoised image is
            x_0 = c_skip x_t / sqrt(abar) + c_out F,
        c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2), sd = sigma_data. (With sd = 1 this is v-prediction,
        F = -v.) EDM's loss weight 1 / c_out^2 on x_0 is a unit weight on F's error. The
        network's noise input c_noise stays the timestep t, a function of sigma alone."""
        sigma2 = (1.0 - alphas_cumprod) / alphas_cumprod
        sd2 = EDM_SIGMA_DATA ** 2
        return {"edm_c_skip_scaled": sd2 / (sigma2 + sd2) / alphas_cumprod.sqrt(),  # c_skip / sqrt(abar)
                "edm_c_out": sigma2.sqrt() * EDM_SIGMA_DATA / (sigma2 + sd2).sqrt(),
                "edm_c_in_scaled": 1.0 / ((sigma2 + sd2) * alphas_cumprod).sqrt()}  # c_in / sqrt(abar)

    @staticmethod
    def _sigmoid_weights(alphas_cumprod: torch.Tensor) -> dict:
        """Kingma & Gao 2023's sigmoid weighting for uniform timesteps: the loss
        integral of w(lambda) ||eps_err||^2 d lambda, w = sigmoid(b - lambda), lambda = log SNR,
        as a weight per timestep on the eps error: w(lambda_t) times the width in lambda of
        timestep t (uniform t samples lambda unevenly), normalised to mean 1."""
        lam = torch.log(alphas_cumprod / (1.0 - alphas_cumprod))
        padded = torch.cat([lam[:1] + (lam[0] - lam[1]), lam, lam[-1:] - (lam[-2] - lam[-1])])
        width = (padded[:-2] - padded[2:]) / 2  # central difference, positive (lam decreases)
        weight = torch.sigmoid(SIGMOID_BIAS - lam) * width
        return {"sigmoid_eps_weight": weight / weight.mean()}

    # ----- q(x_t | x_0) -----
    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None,
                         distribution: str = "uniform", p_mean: float = EDM_P_MEAN,
                         p_std: float = EDM_P_STD) -> torch.Tensor:
        """Training timesteps, shape (batch_size,), int64 in [0, T-1].

        'uniform': every t equally often (DDPM). 'lognormal': log sigma_t ~ N(P_mean, P_std^2)
        with EDM's P_mean = -1.2, P_std = 1.2 (Karras et al. 2022, Table 1) unless given,
        mapped to the timestep whose sigma is the next above: most training at mid noise
        levels, little at the extremes, where the target is nearly determined.
        """
        if distribution == "uniform":
            return torch.randint(0, self.timesteps, (batch_size,), device=device,
                                 generator=generator)
        if distribution == "lognormal":
            log_sigma = p_mean + p_std * torch.randn(batch_size, device=device,
                                                     generator=generator)
            t = torch.searchsorted(self.log_sigmas.to(device), log_sigma)
            return t.clamp(0, self.timesteps - 1)
        raise ValueError(f"unknown timestep distribution {distribution!r}; expected one of "
                         f"{', '.join(TIMESTEP_DISTRIBUTIONS)}")

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), DDPM eq. (4).

        Returns (x_t, noise), both of x0's shape.
        """
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        assert noise.shape == x0.shape, (noise.shape, x0.shape)
        xt = (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
              + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)
        return xt, noise

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for t in -1 .. T-1 (t = -1 is the clean data, alpha_bar = 1); shape (B,)."""
        return self.alphas_cumprod_padded.gather(0, (t.to(self.betas.device) + 1).long())

    # ----- conversions between x_0, eps and v -----
    def predict_x0_from_eps(self, xt, t, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), inverting eq. (4)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt
                - extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape) * eps)

    def predict_eps_from_x0(self, xt, t, x0):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - x0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape))

    def get_velocity(self, x0, noise, t):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)

    def predict_x0_from_v(self, xt, t, v):
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (extract(self.sqrt_alphas_cumprod, t, xt.shape) * xt
                - extract(self.sqrt_one_minus_alphas_cumprod, t, xt.shape) * v)

    def network_input(self, xt, t, prediction: str = "eps"):
        """What the network sees of x_t: x_t itself, or for 'edm' c_in x_t / sqrt(abar)."""
        if prediction == "edm":
            return extract(self.edm_c_in_scaled, t, xt.shape) * xt
        return xt

    def training_target(self, x0, noise, t, prediction: str = "eps"):
        """What the network is trained to output for x_t = add_noise(x0, t, noise)."""
        if prediction == "eps":
            return noise
        if prediction == "v":
            return self.get_velocity(x0, noise, t)
        if prediction == "edm":  # F = (x_0 - c_skip (x_0 + sigma eps)) / c_out, see _edm_tables
            xt, _ = self.add_noise(x0, t, noise)
            return ((x0 - extract(self.edm_c_skip_scaled, t, x0.shape) * xt)
                    / extract(self.edm_c_out, t, x0.shape))
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")

    def split_model_output(self, xt, t, output, prediction: str = "eps", clip_x0: bool = True):
        """Turn a network output into (x0, eps); with clip_x0, x0 is clipped to [-1, 1]
        and eps recomputed from it, so that both describe the same point."""
        if prediction == "eps":
            eps = output
            x0 = self.predict_x0_from_eps(xt, t, eps)
        elif prediction == "v":
            x0 = self.predict_x0_from_v(xt, t, output)
            eps = self.predict_eps_from_x0(xt, t, x0)
        elif prediction == "edm":
            x0 = (extract(self.edm_c_skip_scaled, t, xt.shape) * xt
                  + extract(self.edm_c_out, t, xt.shape) * output)
            eps = self.predict_eps_from_x0(xt, t, x0)
        else:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, t, x0)
        return x0, eps

    def loss_weight(self, t, prediction: str = "eps", weighting: str = "none", gamma: float = 5.0):
        """Per-sample weights, shape (B,), of the squared error of the network's output.

        'min-snr' is Hang et al. 2023: min(SNR, gamma) / SNR for eps targets,
        min(SNR, gamma) / (SNR + 1) for v targets. 'sigmoid' is Kingma & Gao 2023 (see
        _sigmoid_weights), converted from the eps error to the output's: the v error is the
        eps error / sqrt(abar), so its weight carries a factor abar (eps-prediction only
        and v-prediction: EDM's F has a weighting of its own)."""
        if weighting == "none":
            return torch.ones(t.shape, device=self.betas.device)
        t = t.to(self.betas.device).long()
        if weighting == "min-snr" and prediction in ("eps", "v"):
            snr = self.snr.gather(0, t)
            clipped = snr.clamp(max=gamma)
            return clipped / snr if prediction == "eps" else clipped / (snr + 1.0)
        if weighting == "sigmoid" and prediction in ("eps", "v"):
            weight = self.sigmoid_eps_weight.gather(0, t)
            return weight if prediction == "eps" else weight * self.alphas_cumprod.gather(0, t)
        raise ValueError(f"unknown loss weighting {weighting!r} for {prediction}-prediction; "
                         f"expected one of {', '.join(WEIGHTINGS)} (min-snr and sigmoid: eps "
                         f"or v; edm has its own)")

    # ----- q(x_{t-1} | x_t, x_0) -----
    def q_posterior(self, x0, xt, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), DDPM eqs. (6)-(7)."""
        mean = (extract(self.posterior_mean_coef1, t, xt.shape) * x0
                + extract(self.posterior_mean_coef2, t, xt.shape) * xt)
        variance = extract(self.posterior_variance, t, xt.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, xt.shape)
        return mean, variance, log_variance

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, schedule_type={self.schedule_type!r}"
