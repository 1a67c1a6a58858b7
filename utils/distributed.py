"""Several processes under torchrun: the process group, who does what, and waits that
cannot time out.

`torchrun --nproc_per_node N main.py` starts N copies of the script with RANK,
LOCAL_RANK and WORLD_SIZE in their environment; `init()` joins them into one process
group (NCCL on CUDA, one GPU per process; gloo on the CPU). A plain `python main.py`
has no WORLD_SIZE, and every function here then answers for a single process without
touching torch.distributed, so it pays nothing.

The division of labour (see docs/training.md, "More than one GPU"):
- every rank draws the same global batch, timesteps and noise and keeps its slice
  (`local_slice`), so the mathematics does not depend on the number of processes;
- rank 0 alone writes files and shows progress; the others print only errors;
- work that only rank 0 does (saving, pictures, metrics) is waited for through the
  rendezvous store (`wait_for_rank0`), which polls and never times out, rather than
  in a collective that would time out on a slow save;
- decisions every rank must share (stop on a signal, out of time, the time fraction
  that drives the learning-rate schedule) go through `agree` (an all-reduce of max).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time

import torch

from utils.errors import ResourceError

# A collective that waits longer than this means another process is gone: fail clearly.
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("MNIST_DIFFUSION_DIST_TIMEOUT_MIN", 10)))


class PeerLost(ResourceError):
    """Another process of the run died or stopped answering."""


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_alone = {"on": False}


def is_initialized() -> bool:
    """True inside a process group (and not inside `alone()`)."""
    return (not _alone["on"] and torch.distributed.is_available()
            and torch.distributed.is_initialized())


@contextlib.contextmanager
def alone():
    """Act as a single process for a while (e.g. rank 0 measuring one process's speed
    inside `wait_for_rank0` while the others wait): no DDP, no slicing, no collectives."""
    _alone["on"] = True
    try:
        yield
    finally:
        _alone["on"] = False


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: str) -> str:
    """The device of this process: cuda:LOCAL_RANK under torchrun on CUDA."""
    if launched() and device.startswith("cuda") and ":" not in device:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def init(device: str) -> None:
    """Join the process group if torchrun started us (no-op otherwise)."""
    if not launched() or is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(local_device(device)))
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)


def shutdown() -> None:
    """Leave the process group together: a barrier first, so that no process tears its
    side down while another still talks to it (gloo can abort on that)."""
    if is_initialized():
        try:
            torch.distributed.barrier()
        except RuntimeError:  # another process is gone already: nothing to wait for
            pass
        torch.distributed.destroy_process_group()


def exit_process(code) -> None:
    """End a script: sys.exit(code), except under torchrun, where the process ends at once
    with os._exit after flushing its output. The process group is gone by then (shutdown);
    what os._exit skips is the interpreter's teardown, where gloo's threads were seen to
    abort a rank ("terminate called without an active exception", about one 2-process
    run in ten on this CPU), which torchrun reports as a failed run."""
    if not launched():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)


def local_slice(global_size: int) -> slice:
    """This rank's part of a global batch: contiguous, sizes differing by at most one."""
    n, r = world_size(), rank()
    base, extra = divmod(global_size, n)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def agree(*values: float, device="cpu") -> list[float]:
    """The maximum of each value over all ranks (the values themselves in one process)."""
    if not is_initialized():
        return list(values)
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def gather_to_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's CPU tensor in rank order on rank 0 (None elsewhere)."""
    if not is_initialized():
        return tensor
    parts = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(tensor.cpu(), parts, dst=0)
    return torch.cat(parts) if is_main() else None


def broadcast_object(value):
    """Rank 0's value on every rank."""
    if not is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


_waits = {"n": 0}


def wait_for_rank0(work=None, poll: float = 0.05):
    """Rank 0 runs `work()`; the others wait for it to finish, however long it takes, by
    polling the rendezvous store (no collective, so no timeout). Returns work()'s result
    on rank 0 and None elsewhere. An exception on rank 0 is re-raised there and reported
    to the others as PeerLost."""
    if not is_initialized():
        return work() if work is not None else None
    _waits["n"] += 1
    key = f"mnist-diffusion-wait-{_waits['n']}"
    store = torch.distributed.distributed_c10d._get_default_store()
    if is_main():
        try:
            result = work() if work is not None else None
        except BaseException as error:
            store.set(key, f"error: {type(error).__name__}")
            raise
        store.set(key, "ok")
        return result
    while not store.check([key]):
        time.sleep(poll)
    status = store.get(key).decode()
    if status != "ok":
        raise PeerLost(f"rank 0 stopped ({status[7:]}); see its message")
    return None
