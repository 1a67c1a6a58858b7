"""DiffusionModel: the UNet plus the noise schedule, with training loss and sampling.

The schedule's tables live in `NoiseScheduler` (utils/noise_scheduler.py) and the
sampling algorithms in `models/samplers.py`; this class wires them to the network,
including classifier-free guidance for class-conditional models (`denoiser`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from config import Config, ConfigError
from models import samplers
from models.unet import UNet
from utils import allocator, hub
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.clusters import clusters_of
from utils.noise_scheduler import PREDICTIONS, NoiseScheduler
from utils.seeding import PerSampleNoise


class DiffusionModel(nn.Module):
    """A DDPM (Ho et al. 2020) on a UNet.

    Args mirror Config: timesteps, beta_start, beta_end and schedule_type build the
    NoiseScheduler; in_channels .. dropout build the UNet; prediction is what the
    network outputs ('eps', 'v' or EDM's 'edm'); loss_weighting is 'none', 'min-snr' or
    'sigmoid'; num_classes > 0 makes the network class-conditional (labels num_classes,
    or None, mean "no class").
    `model.config` is the Config it was built from (`from_config`, `from_checkpoint`), or
    one describing these arguments.
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 in_channels: int = 1, model_channels: int = 64, time_embed_dim: int = 256,
                 schedule_type: str = "linear", channel_mult: tuple = (1, 2, 2),
                 num_res_blocks: int = 2, attention: bool = True, dropout: float = 0.0,
                 image_size: int = 28, prediction: str = "eps", loss_weighting: str = "none",
                 clip_x0: bool = True, patch_size: int = 1, num_classes: int = 0,
                 config: Config | None = None):
        super().__init__()
        self.config = config or Config(
            TIMESTEPS=timesteps, BETA_START=beta_start, BETA_END=beta_end, CHANNELS=in_channels,
            MODEL_CHANNELS=model_channels, TIME_EMBED_DIM=time_embed_dim,
            SCHEDULE_TYPE=schedule_type, CHANNEL_MULT=tuple(channel_mult),
            NUM_RES_BLOCKS=num_res_blocks, ATTENTION=attention, DROPOUT=dropout,
            IMAGE_SIZE=image_size, PREDICTION=prediction, LOSS_WEIGHTING=loss_weighting,
            PATCH_SIZE=patch_size, CONDITIONAL=num_classes > 0,
            DATASET="mnist" if (in_channels, image_size) == (1, 28) else "folder",
            CLASS_NAMES=tuple(str(k) for k in range(num_classes)), DEVICE="cpu")
        self.scheduler = NoiseScheduler(timesteps, beta_start, beta_end, schedule_type)
        self.unet = UNet(in_channels, model_channels, time_embed_dim, tuple(channel_mult),
                         num_res_blocks, attention, dropout, patch_size=patch_size,
                         num_classes=num_classes)
        self.num_classes = num_classes
        self.image_shape = (in_channels, image_size, image_size)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of "
                             f"{', '.join(PREDICTIONS)}")
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.clip_x0 = clip_x0

    @classmethod
    def from_config(cls, config: Config) -> "DiffusionModel":
        return cls(config=config, timesteps=config.TIMESTEPS, beta_start=config.BETA_START,
                   beta_end=config.BETA_END, in_channels=config.CHANNELS,
                   model_channels=config.MODEL_CHANNELS, time_embed_dim=config.TIME_EMBED_DIM,
                   schedule_type=config.SCHEDULE_TYPE, channel_mult=config.CHANNEL_MULT,
                   num_res_blocks=config.NUM_RES_BLOCKS, attention=config.ATTENTION,
                   dropout=config.DROPOUT, image_size=config.IMAGE_SIZE,
                   prediction=config.PREDICTION, loss_weighting=config.LOSS_WEIGHTING,
                   patch_size=config.PATCH_SIZE,
                   num_classes=config.num_classes)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", ema: bool = True):
        """Rebuild the model from a checkpoint alone: returns (model in eval mode, Config).

        `path` is a checkpoint file of main.py, or a model folder in the Hugging Face layout
        (utils/hub.py: config.json and model.safetensors, as scripts/export.py writes).
        ema=True loads the averaged weights used for sampling; False the raw weights (a
        training checkpoint's). A checkpoint that keeps an early snapshot for autoguidance
        gives it as `model.guide`. Raises utils.checkpoint.CheckpointError for a bad file.
        """
        folder = Path(path).is_dir()
        state = hub.read_folder(path) if folder else load_checkpoint(path)
        if not ema and "model" not in state:
            raise CheckpointError(f"{path} holds the averaged (EMA) weights only; the raw "
                                  f"weights are in the checkpoints of the run that trained it")
        named = (lambda name: Path(path) / name) if folder else (lambda name: f"checkpoint {path}")
        try:
            config = Config.from_dict(state["config"]).validate()
            model = cls.from_config(config)
        except (ConfigError, RuntimeError, TypeError, ValueError) as error:
            raise CheckpointError(f"{named(hub.CONFIG)} does not describe a model this code "
                                  f"can build: {_first_reason(error)}") from None
        _load_weights(model, state["ema" if ema else "model"], named(hub.WEIGHTS))
        if isinstance(state.get("guide"), dict):  # the run's early snapshot (GUIDE_AT)
            model.set_guide(_load_weights(cls.from_config(config), state["guide"],
                                          named(hub.GUIDE)))
        return model.to(device).eval().requires_grad_(False), config

    @property
    def timesteps(self) -> int:
        return self.scheduler.timesteps

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def null_label(self) -> int:
        """The "no class" token of a conditional model."""
        return self.num_classes

    # ----- training -----
    def forward_diffusion(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t ~ q(x_t | x_0); returns (x_t, noise)."""
        return self.scheduler.add_noise(x0, t, noise)

    def forward(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise x0 to level t and run the network: returns (network output, noise)."""
        xt, noise = self.forward_diffusion(x0, t, noise)
        return self.network(xt, t, labels), noise

    def network(self, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The UNet's raw output (eps, v or EDM's F) at x_t: what it sees of x_t is the
        scheduler's `network_input` (x_t itself but for EDM's c_in)."""
        return self.unet(self.scheduler.network_input(xt, t, self.prediction), t, labels)

    def compute_loss(self, x0: torch.Tensor, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, reduction: str = "mean",
                     forward=None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error between the network output and its target (the noise for
        eps-prediction, DDPM eq. 14), weighted per timestep if loss_weighting asks.

        reduction 'mean' averages over the batch; 'none' returns the (B,) per-image
        losses. forward: the module to run instead of self (a DistributedDataParallel
        wrapper of it, whose gradient hooks then fire). labels: the (B,) classes of a
        conditional model, null_label where the class is dropped."""
        if t is None:
            t = self.scheduler.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        output, noise = (forward or self)(x0, t, noise, labels)
        target = self.scheduler.training_target(x0, noise, t, self.prediction)
        assert output.shape == target.shape, (output.shape, target.shape)
        per_image = (output.float() - target).square().mean(dim=tuple(range(1, x0.dim())))
        if self.loss_weighting != "none":
            per_image = per_image * self.scheduler.loss_weight(t, self.prediction,
                                                               self.loss_weighting)
        if reduction == "none":
            return per_image
        if reduction == "mean":
            return per_image.mean()
        raise ValueError(f"unknown reduction {reduction!r}; expected one of mean, none")

    # ----- sampling -----
    def reverse_diffusion_step(self, xt: torch.Tensor, t, predicted_noise: torch.Tensor,
                               noise: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} given the network's output at (x_t, t).

        t is an int or a (B,) tensor; noise defaults to fresh N(0, I) and is not used at t = 0.
        """
        if not torch.is_tensor(t):
            t = torch.full((xt.shape[0],), int(t), device=xt.device, dtype=torch.long)
        x0, _ = self.scheduler.split_model_output(xt, t, predicted_noise, self.prediction,
                                                  self.clip_x0)
        if noise is None:
            noise = torch.randn_like(xt)
        return samplers.ddpm_step(self.scheduler, xt, t, x0, noise)

    def denoiser(self, precision: str = "fp32", labels: torch.Tensor | None = None,
                 guidance: float = 1.0, rescale: float = 0.0, guide: "DiffusionModel | None" = None,
                 autoguidance: float = 1.0, interval: tuple | None = None):
        """The network as a sampler's `denoiser(x, t)`, under bf16 autocast if asked.

        With `labels` (a conditional model; (B,) digits or (B, num_classes + 1) class
        weights), classifier-free guidance (Ho & Salimans 2022) with scale W = `guidance`:

            out = out_u + W (out_c - out_u),

        out_c the output for the labels and out_u for "no class", both from one network
        call on the doubled batch. W = 0 is the unconditional model, W = 1 the plain
        conditional one (each then needs only its own half, one call on B images), W > 1
        pushes further towards the class. The raw outputs are mixed: for eps, v and EDM's F
        alike that is the guided eps, since each is affine in eps at a fixed x_t.
        `rescale` phi (Lin et al. 2023, eq. 15-16) pulls each guided image's standard
        deviation back towards the conditional output's, against oversaturation:

            out = phi * out * std(out_c) / std(out) + (1 - phi) * out.

        Autoguidance (Karras et al. 2024) with scale A = `autoguidance` steers away from a
        weaker version of the model, `guide` (an early snapshot of the run, or a smaller
        model), asked for the same class: out = guide + A (out - guide), i.e.

            out = out_c + (W - 1)(out_c - out_u) + (A - 1)(out_c - guide_c);

        A = 1 is off. It needs no labels, so it works for unconditional models too.
        `interval` (lo, hi): guide only where lo < sigma_t <= hi (Kynkaenniemi et al. 2024),
        sigma_t = sqrt((1 - abar_t) / abar_t); elsewhere the plain prediction (one call).
        """
        allocator.tune()  # every sampler, editor and teacher comes here: big temporaries at
        # every step, kept off mmap (utils/allocator.py)
        network = self._network_call(precision)
        labels, plain = self._plain_labels(labels, guidance)
        cfg = labels is not None and guidance not in (0, 1)
        guide_net, guide_labels = None, None
        if autoguidance != 1:
            guide_net = self.check_guide(guide)._network_call(precision)
            guide_labels = plain if guide.conditional else None
        if not cfg and guide_net is None:
            return lambda x, t: network(x, t, plain)
        both = torch.cat([labels, self.null_labels_like(labels)]) if cfg else None
        within = self._interval(interval)

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inside = within(t)
            if not inside.any():
                return network(x, t, plain)
            if cfg:
                out_c, out_u = network(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
                out = out_u + guidance * (out_c - out_u)
                if rescale:
                    dims = tuple(range(1, x.dim()))
                    ratio = out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True)
                    out = rescale * out * ratio + (1 - rescale) * out
            else:
                out = out_c = network(x, t, plain)
            if guide_net is not None:
                out = out + (autoguidance - 1) * (out_c - guide_net(x, t, guide_labels))
            if not inside.all():  # a batch of mixed noise levels: plain outside the interval
                shape = (-1,) + (1,) * (x.dim() - 1)
                out = torch.where(inside.reshape(shape), out, network(x, t, plain))
            return out
        return guided

    def _interval(self, interval: tuple | None):
        """t -> whether lo < sigma_t <= hi, per image ((B,) bool); all True without one."""
        if not interval:
            return lambda t: torch.ones(t.shape, dtype=torch.bool, device=t.device)
        low = math.log(interval[0]) if interval[0] > 0 else -math.inf
        high = math.log(interval[1])
        log_sigmas = self.scheduler.log_sigmas
        return lambda t: (lambda s: (s > low) & (s <= high))(
            log_sigmas.gather(0, t.to(log_sigmas.device).long()))

    def _network_call(self, precision: str):
        """self.network(x, t, labels), under bf16 autocast (returning float32) if asked."""
        def network(x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
            if precision != "bf16":
                return self.network(x, t, y)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.network(x, t, y).float()
        return network

    def _plain_labels(self, labels: torch.Tensor | None, guidance: float):
        """(labels on the model's device, the labels of the unguided prediction): the labels
        themselves, "no class" for guidance 0, None for a draw without classes."""
        if labels is None:
            return None, None
        if not self.conditional:
            raise ValueError("this model has no classes: it was trained without --conditional")
        if labels.is_floating_point() and labels.shape[1:] != (self.num_classes + 1,):
            raise ValueError(f"float labels are class weights of shape (B, {self.num_classes + 1}); "
                             f"got {tuple(labels.shape)} (digits are integers)")
        labels = labels.to(self.scheduler.betas.device)
        return labels, (self.null_labels_like(labels) if guidance == 0 else labels)

    @property
    def guide(self) -> "DiffusionModel | None":
        """The weaker model that autoguidance steers away from: the early snapshot its
        checkpoint keeps (Config.GUIDE_AT), or one set with `set_guide`; None if neither."""
        return self.__dict__.get("_guide")

    def set_guide(self, guide: "DiffusionModel | None") -> "DiffusionModel":
        """Use `guide` for autoguidance (checked to fit). Kept outside the module tree, so
        the model's state_dict and parameters stay its own."""
        self.__dict__["_guide"] = None if guide is None else self.check_guide(guide)
        return self

    def check_guide(self, guide: "DiffusionModel | None") -> "DiffusionModel":
        """`guide`, moved to this model's device, if it can guide this model: the same
        schedule, timesteps, prediction, image shape and classes; ValueError otherwise."""
        if guide is None:
            raise ValueError("autoguidance needs a guide: this checkpoint keeps none (trained "
                             "with --guide-at 0, or before it existed); name one with --guide "
                             "CKPT, e.g. an early checkpoint of the same run")
        mine, theirs = self.config, guide.config
        for name in ("TIMESTEPS", "SCHEDULE_TYPE", "BETA_START", "BETA_END", "PREDICTION",
                     "CHANNELS", "IMAGE_SIZE"):
            if getattr(mine, name) != getattr(theirs, name):
                raise ValueError(f"the guide does not fit this model: {name} "
                                 f"{getattr(theirs, name)} against {getattr(mine, name)}")
        if guide.conditional and mine.class_names != theirs.class_names:
            raise ValueError(f"the guide's classes ({', '.join(theirs.class_names)}) are not "
                             f"this model's ({', '.join(mine.class_names) or 'none'})")
        return guide.to(self.scheduler.betas.device).eval().requires_grad_(False)

    def null_labels_like(self, labels: torch.Tensor) -> torch.Tensor:
        """"No class" in the form of `labels`: the null token, or one-hot weights on it."""
        if labels.is_floating_point():
            null = torch.zeros_like(labels)
            null[:, self.null_label] = 1
            return null
        return torch.full_like(labels, self.null_label)

    @torch.no_grad()
    def sample(self, shape: tuple, device=None, sampler: str = "ddpm", steps: int | None = None,
               eta: float = 0.0, seed: int = 0, first_index: int = 0, precision: str = "fp32",
               spacing: str = "auto", callback=None, progress: bool = False,
               labels: torch.Tensor | None = None, guidance: float = 1.0,
               guidance_rescale: float = 0.0, autoguidance: float = 1.0,
               guidance_interval: tuple | None = None,
               guide: "DiffusionModel | None" = None) -> torch.Tensor:
        """Draw shape[0] images in [-1, 1]; by default with full T-step ancestral DDPM.

        Image k uses the noise of index first_index + k under `seed`, whatever the batch.
        labels (conditional models): the class of each image (see `denoiser`), sampled
        with classifier-free guidance of scale `guidance`; None draws unconditionally, or,
        for a model that learned clusters of its images as classes (Config.CLUSTERS), each
        image of the cluster `utils.clusters.clusters_of` gives its index (in proportion
        to the clusters' sizes).
        autoguidance A != 1 steers away from `guide` (default: `self.guide`, the
        checkpoint's early snapshot); guidance_interval (lo, hi) limits both guidances to
        those noise levels sigma (see `denoiser`).
        """
        device = self.scheduler.betas.device if device is None else torch.device(device)
        indices = range(first_index, first_index + shape[0])
        noise = PerSampleNoise(seed, indices, tuple(shape[1:]), device)
        if labels is None and self.config.CLUSTER_SIZES:
            labels = clusters_of(self.config.CLUSTER_SIZES, indices, device)
        denoiser = self.denoiser(precision, labels, guidance, guidance_rescale,
                                 guide if guide is not None else self.guide, autoguidance,
                                 guidance_interval)
        was_training = self.training
        self.eval()
        try:
            x = samplers.sample(denoiser, self.scheduler, noise.initial(), sampler,
                                steps, eta, noise, self.prediction, self.clip_x0, callback,
                                progress, None if spacing == "auto" else spacing)
        finally:
            self.train(was_training)
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def generate(self, num_samples: int, batch_size: int = 500, progress: bool = True,
                 first_index: int = 0, labels: torch.Tensor | None = None,
                 **sample_kwargs) -> torch.Tensor:
        """Images first_index .. first_index + num_samples - 1 in [-1, 1] on the model's
        device, in batches, with a progress bar; image i is the same for every batch_size
        (and for every split of the indices between processes). labels: the num_samples
        classes of a conditional model (guidance and the rest go to `sample`)."""
        if labels is not None and len(labels) != num_samples:
            raise ValueError(f"{len(labels)} labels for {num_samples} samples")
        images = []
        bar = tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress)
        for start in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - start)
            part = None if labels is None else labels[start:start + count]
            images.append(self.sample((count, *self.image_shape), first_index=first_index + start,
                                      labels=part, **sample_kwargs))
            bar.update(count)
        bar.close()
        if not images:
            return torch.empty(0, *self.image_shape, device=self.scheduler.betas.device)
        return torch.cat(images)


def _load_weights(model: DiffusionModel, weights: dict, source) -> DiffusionModel:
    """`model` with `weights` loaded; CheckpointError naming `source` if they do not fit."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source} does not fit the model its config describes: "
                              f"{_first_reason(error)}") from None
    return model


def _first_reason(error: BaseException) -> str:
    """An error's first informative line: for load_state_dict's, the first mismatch
    ("size mismatch for unet...", "Missing key(s) ...") rather than its heading."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return lines[0][:240] if lines else type(error).__name__
