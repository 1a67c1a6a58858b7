"""What machine the code runs on: a small record for checkpoints (where a run trained), model
cards and speed reports, and the same in words ("2-core AMD EPYC 7B13 CPU (2 threads),
PyTorch 2.14.1"); whether its CPU computes bf16 natively; and how many CPU threads to take
when other work keeps cores busy.
"""
from __future__ import annotations

import os
import platform
import time

import torch

from utils import distributed as dist


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


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX BF16), where bf16
    autocast trains the CPU preset 1.3 times as many steps a second as fp32 (the 2-core
    AMD EPYC with AVX-512 BF16: 17,600 steps in 15 minutes against 13,509,
    docs/training.md#bf16-on-a-cpu)."""
    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch, or one built without cpuinfo
        return False
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def record(device="cpu") -> dict:
    """{'cpu', 'cores', 'threads', 'gpu' (None on the CPU), 'torch'} of this process, for
    work on `device`."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": gpu, "torch": str(torch.__version__)}  # str: TorchVersion would not load weights_only


def describe(machine: dict) -> str:
    """A `record` in words: the GPU, else the CPU with its cores and threads; the precision
    where a training run recorded it; then torch."""
    if machine.get("gpu"):
        where = f"{machine['gpu']} GPU"
    else:
        threads = machine.get("threads")
        where = (f"{machine.get('cores')}-core {machine.get('cpu')} CPU "
                 f"({threads} thread{'s' if threads != 1 else ''})")
    precision = f", {machine['precision']}" if machine.get("precision") else ""
    return f"{where}{precision}, PyTorch {machine.get('torch')}"


def idle_cores(seconds: float = 0.2) -> float | None:
    """How many of the machine's cores no program used in the next `seconds` (this process
    sleeps meanwhile, so it does not count itself), from Linux's /proc/stat; None elsewhere."""
    def cpu_times():
        with open("/proc/stat") as f:  # "cpu  user nice system idle iowait irq softirq steal ..."
            ticks = [int(x) for x in f.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]
    try:
        total, idle = cpu_times()
        time.sleep(seconds)
        total2, idle2 = cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total2 <= total:
        return None
    return (os.cpu_count() or 1) * (idle2 - idle) / (total2 - total)


def share_cpu(threads: int = 0, device="cpu") -> str | None:
    """Set torch's CPU threads: `threads` when given (--threads). Else, on the CPU, take no more
    threads than the cores other programs leave idle (at least one): two programs that each
    take every core make both several times slower (a sampling run beside a training run on
    2 cores: 3x). Returns a line that says so when it took fewer, else None. It only ever
    lowers the count, and leaves a count set by OMP_NUM_THREADS as it is."""
    if threads:
        torch.set_num_threads(threads)
        return None
    current = torch.get_num_threads()
    if (torch.device(device).type != "cpu" or current <= 1 or "OMP_NUM_THREADS" in os.environ
            or dist.launched()):  # torchrun's processes share the cores on their own
        return None
    idle = idle_cores()
    if idle is None or round(idle) >= current:
        return None
    take = max(1, round(idle))
    torch.set_num_threads(take)
    busy = (os.cpu_count() or 1) - idle
    return (f"{busy:.1f} of {os.cpu_count()} cores busy with other work: {take} thread"
            f"{'s' if take != 1 else ''} instead of {current} (--threads N to choose)")
