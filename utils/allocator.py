"""The C allocator's settings for a process that makes large temporaries at every step.

glibc's malloc serves each block above a threshold (128 KB, rising as it adapts) with
its own mmap and gives freed memory back to the system; the UNet's activations are
such blocks, allocated and freed at every network evaluation, so the kernel maps,
zero-fills and unmaps them again and again. Measured on a 2-core CPU (the CPU preset,
500 digits, 20 steps): 18.2 s wall with 4.5 s of system time, against 11.3 s and 0.1 s
with the thresholds raised (`python -m scripts.speed --allocator`, docs/gpu.md). So
every entry point calls `tune()`: blocks up to 1 GB come from the heap, which keeps
freed memory for the next step. A no-op where glibc is not the allocator, or with
MNIST_DIFFUSION_DEFAULT_MALLOC=1 in the environment (to measure the difference).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # bytes

_state = {"tuned": None}


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set."""
    if _state["tuned"] is not None:
        return _state["tuned"]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("MNIST_DIFFUSION_DEFAULT_MALLOC") != "1":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            ok = False
    _state["tuned"] = ok
    return ok
