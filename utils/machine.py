"""What machine the code runs on: a small record for checkpoints (where a run trained), model
cards and speed reports, and the same in words ("2-core AMD EPYC 7B13 CPU (2 threads),
PyTorch 2.14.1").
"""
from __future__ import annotations

import os
import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform reports."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def record(device="cpu") -> dict:
    """{'cpu', 'cores', 'threads', 'gpu' (None on the CPU), 'torch'} of this process, for
    work on `device`."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": gpu, "torch": str(torch.__version__)}  # str: TorchVersion would not load weights_only


def describe(machine: dict) -> str:
    """A `record` in words: the GPU, else the CPU with its cores and threads; then torch."""
    if machine.get("gpu"):
        where = f"{machine['gpu']} GPU"
    else:
        threads = machine.get("threads")
        where = (f"{machine.get('cores')}-core {machine.get('cpu')} CPU "
                 f"({threads} thread{'s' if threads != 1 else ''})")
    return f"{where}, PyTorch {machine.get('torch')}"
