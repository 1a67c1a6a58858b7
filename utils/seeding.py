"""Reproducibility: per-sample noise, global seeding, and random-state capture for resume."""
from __future__ import annotations

import random

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image `index` of a run seeded with `seed`."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class PerSampleNoise:
    """All the noise a sampler needs for a batch, drawn from one generator per image.

    Image `indices[k]` of a run seeded with `seed` gets the same starting noise x_T and
    the same per-step noise whatever batch it is drawn in (EDM's per-image seeds).
    Step noise is drawn `chunk` steps at a time per image to keep Python overhead low;
    steps must be requested in increasing order.

    initial() -> x_T of shape (B, *shape); noise(i) (this object called) -> step i's noise.
    """

    def __init__(self, seed: int, indices, shape: tuple, device, chunk: int = 25):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
        self.shape = tuple(shape)
        self.device = device
        self.chunk = chunk
        self._buffer = None
        self._start = 0
        self._last = -1

    def _draw(self, count: int) -> torch.Tensor:
        return torch.stack([torch.randn((count, *self.shape), generator=g)
                            for g in self.generators], dim=1)

    def initial(self) -> torch.Tensor:
        return self._draw(1)[0].to(self.device)

    def __call__(self, step: int) -> torch.Tensor:
        if step <= self._last:
            raise ValueError(f"step noise must be requested in increasing order ({step} after {self._last})")
        self._last = step
        while self._buffer is None or step >= self._start + self._buffer.shape[0]:
            if self._buffer is not None:
                self._start += self._buffer.shape[0]
            self._buffer = self._draw(self.chunk).to(self.device)
        return self._buffer[step - self._start]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Global random states as tensors and plain values (safe for weights_only loading)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the machine that saved it: this one may have fewer (or more)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _as_tuples(value):
    """random.setstate needs tuples where a round trip may have produced lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
