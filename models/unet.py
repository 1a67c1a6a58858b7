"""A small UNet for 28x28 digits: 28 -> 14 -> 7 and back, conditioned on the timestep
and, if built with classes, on the digit's class.

Residual blocks with GroupNorm and SiLU take the timestep embedding as a scale and
shift of their second normalisation (improved-diffusion's use_scale_shift_norm);
self-attention runs at the lowest resolution. The last convolution of every
residual branch, of attention and of the output is zero-initialised, so each
block starts as the identity and the untrained network predicts zero noise.

A class-conditional UNet (num_classes > 0) adds a learned class embedding to the
timestep embedding (as in Ho & Salimans 2022); the extra last row is the "no class"
token that classifier-free guidance needs for the unconditional prediction. It starts
at zero, so a new conditional network begins as an unconditional one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    """Largest group count <= 32 that divides `channels` with at least 2 channels per group."""
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017; DDPM appendix B).

    (B,) integer or float timesteps -> (B, embed_dim).
    """

    def __init__(self, embed_dim: int, max_period: float = 10000.0):
        super().__init__()
        self.embed_dim = embed_dim
        half = embed_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        assert timesteps.dim() == 1, f"timesteps must have shape (B,), got {tuple(timesteps.shape)}"
        args = timesteps.float()[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.embed_dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then GroupNorm scaled and shifted by the time
    embedding -> SiLU -> dropout -> conv, plus a (1x1 if needed) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, 2 * out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual."""

    def __init__(self, channels: int, num_heads: int = 4):
        super().__init__()
        assert channels % num_heads == 0, (channels, num_heads)
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        # (3, B, heads, HW, C/heads), contiguous: SDPA's fused kernels need a unit stride
        # in the last dimension and fall back to the slow math path without it.
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class DownBlock(nn.Module):
    """Residual blocks at one resolution that take in the time embedding.

    forward(x, time_emb): x is (B, in_channels, H, W); returns the processed features
    (B, out_channels, H, W). Its `downsample` (a stride-2 convolution, or the identity
    with downsample=False) takes them to the next resolution: the UNet applies it after
    keeping the features as the skip for the UpBlock at this resolution.
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int,
                 num_res_blocks: int = 2, dropout: float = 0.0, downsample: bool = True):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, time_embed_dim, dropout)
            for i in range(num_res_blocks))
        self.downsample = (nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
                           if downsample else nn.Identity())

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x, time_emb)
        return x


class UpBlock(nn.Module):
    """Nearest-neighbour upsampling and a convolution to out_channels, concatenation of
    the skip from the matching DownBlock, then residual blocks that take in the time
    embedding. (Reducing the width in the upsampling convolution, rather than after it,
    saves about a sixth of the UNet's FLOPs at 28x28.)

    forward(x, skip, time_emb): x is (B, in_channels, H, W), skip (B, skip_channels, 2H,
    2W); returns (B, out_channels, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, time_embed_dim: int,
                 skip_channels: int | None = None, num_res_blocks: int = 2,
                 dropout: float = 0.0, upsample: bool = True):
        super().__init__()
        skip_channels = out_channels if skip_channels is None else skip_channels
        self.upsample = upsample
        self.up_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1) if upsample else nn.Identity()
        first = (out_channels if upsample else in_channels) + skip_channels
        self.res_blocks = nn.ModuleList(
            ResBlock(first if i == 0 else out_channels, out_channels, time_embed_dim, dropout)
            for i in range(num_res_blocks))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = self.up_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = torch.cat([x, skip], dim=1)
        for block in self.res_blocks:
            x = block(x, time_emb)
        return x


class UNet(nn.Module):
    """Noise-prediction UNet.

    With channel_mult=(1, 2, 2) and 28x28 inputs the resolutions are 28 -> 14 -> 7 (with
    patch_size=2 and channel_mult=(1, 2): 14 -> 7, on 2x2 patches of pixels):
    a DownBlock per resolution above the lowest, a middle of ResBlock, attention and
    ResBlock at the lowest, and an UpBlock per DownBlock on the way back.

    forward(x: (B, C, H, W), timesteps: (B,), labels=None) -> predicted noise, (B, C, H, W).
    labels (class-conditional networks only): (B,) class indices, num_classes meaning "no
    class" (also what None means), or (B, num_classes + 1) weights that mix the class
    embeddings (a weighted sum, to interpolate between classes).
    """

    def __init__(self, in_channels: int = 1, model_channels: int = 64, time_embed_dim: int = 256,
                 channel_mult: tuple = (1, 2, 2), num_res_blocks: int = 2,
                 attention: bool = True, dropout: float = 0.0, num_heads: int = 4,
                 patch_size: int = 1, num_classes: int = 0):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.time_embed = nn.Sequential(
            TimeEmbedding(model_channels),
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        # rows 0 .. num_classes - 1: the classes; row num_classes: "no class"
        self.class_embed = (nn.Embedding(num_classes + 1, time_embed_dim) if num_classes
                            else None)
        if self.class_embed is not None:
            nn.init.zeros_(self.class_embed.weight)
        # patch_size p > 1 folds p x p pixels into channels first (pixel_unshuffle), so the
        # network starts at 28/p resolution: much cheaper, for small CPU models.
        self.input_conv = nn.Conv2d(in_channels * patch_size ** 2, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = widths[0]
        for width in widths[:-1]:
            self.down_blocks.append(DownBlock(channels, width, time_embed_dim, num_res_blocks, dropout))
            channels = width
        bottom = widths[-1]
        self.mid_res1 = ResBlock(channels, bottom, time_embed_dim, dropout)
        self.mid_attn = AttentionBlock(bottom, num_heads) if attention else nn.Identity()
        self.mid_res2 = ResBlock(bottom, bottom, time_embed_dim, dropout)
        channels = bottom
        self.up_blocks = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up_blocks.append(UpBlock(channels, width, time_embed_dim, width, num_res_blocks, dropout))
            channels = width
        self.out = nn.Sequential(_norm(channels), nn.SiLU(),
                                 _zero(nn.Conv2d(channels, in_channels * patch_size ** 2, 3,
                                                 padding=1)))

    def embed_class(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """The class embedding (B, time_embed_dim) of `labels` (see forward)."""
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if labels.is_floating_point():
            assert labels.shape == (batch, self.num_classes + 1), \
                f"class weights must have shape ({batch}, {self.num_classes + 1}), got {tuple(labels.shape)}"
            with torch.autocast(labels.device.type, enabled=False):  # fp32, as the lookup
                return labels.float() @ self.class_embed.weight.float()
        assert labels.shape == (batch,), f"labels must have shape ({batch},), got {tuple(labels.shape)}"
        return self.class_embed(labels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        assert x.dim() == 4 and x.shape[1] == self.in_channels, \
            f"expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
        assert timesteps.shape == (x.shape[0],), \
            f"timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}"
        emb = self.time_embed(timesteps)
        if self.class_embed is not None:
            emb = emb + self.embed_class(labels, x.shape[0], x.device)
        else:
            assert labels is None, "this UNet has no classes (built with num_classes=0)"
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.input_conv(x)
        skips = []  # each resolution's features, for the UpBlock at the same resolution
        for block in self.down_blocks:
            h = block(h, emb)
            skips.append(h)
            h = block.downsample(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for block in self.up_blocks:
            h = block(h, skips.pop(), emb)
        out = self.out(h)
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out
