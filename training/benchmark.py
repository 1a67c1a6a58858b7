"""`python main.py --benchmark`: training and sampling speed on this machine, as JSON.

Measures, for the model and settings the flags describe: training images/s after
warm-up (the real training step: in-memory batches, autocast, fused AdamW, EMA),
sampling images/s with the configured sampler (end to end, per-image noise included,
after a warm-up at the timed batch size), the peak memory of training and of
sampling (each on its own), the FLOPs of one training step per image (counted by
torch's FlopCounterMode) and the FLOP/s they imply, as a fraction of the card's
dense bf16 peak where the card is known.
A benchmark, not a test: numbers depend on the machine and on what else runs.
`benchmark_training` and `benchmark_sampling` are the two halves, for scripts
(scripts/gpu_report.py) that need one without the other.
"""
from __future__ import annotations

import platform
import resource
import time
from pathlib import Path

import torch

from config import Config
from sampling.settings import labels_for, resolve, resolve_precision
from training.trainer import Trainer
from utils import distributed as dist
from utils.files import save_json

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s.
BF16_PEAK = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}


def _peak_for(name: str) -> tuple[str, float] | tuple[None, None]:
    for key in sorted(BF16_PEAK, key=len, reverse=True):
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return key, BF16_PEAK[key]
    return None, None


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    """CUDA: the most allocated since the last _reset_peak. CPU: the process's max RSS,
    which cannot be reset (so it includes everything before)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10


def peak_memory_kind(device: torch.device) -> str:
    return ("cuda max_memory_allocated" if device.type == "cuda"
            else "process max RSS (so far; not resettable)")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def training_flops_per_image(trainer, x0: torch.Tensor) -> float:
    """FLOPs of forward + backward of the loss, per image (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports torch._dynamo: seconds

    with FlopCounterMode(display=False) as counter:
        loss = trainer.model.compute_loss(x0, generator=torch.Generator(x0.device).manual_seed(0))
        loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x0.shape[0]


def benchmark_training(trainer, warmup_steps: int, timed_steps: int, log=print,
                       flops: float | None = None) -> dict:
    """Images/s of `trainer.train_step` after `warmup_steps`, FLOPs per image (counted
    unless given: the same model's count from another run), FLOP/s as a fraction of
    the card's bf16 peak, and the peak memory of training alone."""
    config, device = trainer.config, trainer.device
    batches = trainer.batches()
    flops = flops or training_flops_per_image(trainer, next(batches)[0])
    log(f"benchmark on {device}: {sum(p.numel() for p in trainer.params) / 1e6:.2f}M parameters, "
        f"batch {config.BATCH_SIZE}, {trainer.precision}, "
        f"{'compiled' if config.COMPILE else 'eager'}"
        f"{', channels_last' if config.CHANNELS_LAST else ''}; "
        f"{flops / 1e9:.3f} GFLOP per training image")
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(warmup_steps):
        trainer.train_step(*next(batches))
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    images = 0
    for _ in range(timed_steps):
        x0, labels = next(batches)
        trainer.train_step(x0, labels)
        images += x0.shape[0]
    _sync(device)
    train_seconds = time.perf_counter() - start
    train_rate = images / train_seconds
    peak_mb = _peak_mb(device)
    name = device_name(device)
    card, peak = _peak_for(name) if device.type == "cuda" else (None, None)
    achieved = flops * train_rate
    log(f"training: {train_rate:,.0f} images/s ({timed_steps} steps after {warmup_steps} warm-up "
        f"steps that took {warmup_seconds:.1f} s); peak memory {peak_mb:,.0f} MB; "
        f"{achieved / 1e12:.3f} TFLOP/s"
        + (f" = {100 * achieved / peak:.1f}% of the {card}'s bf16 peak" if peak else ""))
    return {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in trainer.params),
        "batch_size": config.BATCH_SIZE, "precision": trainer.precision,
        "channels_last": config.CHANNELS_LAST, "compile": config.COMPILE,
        "model_channels": config.MODEL_CHANNELS, "channel_mult": list(config.CHANNEL_MULT),
        "num_res_blocks": config.NUM_RES_BLOCKS, "attention": config.ATTENTION,
        "train_images_per_s": train_rate,
        "train_seconds_per_epoch": trainer.steps_per_epoch * config.BATCH_SIZE / train_rate,
        "warmup_steps": warmup_steps, "timed_steps": timed_steps,
        "warmup_seconds": warmup_seconds,
        "train_peak_memory_mb": peak_mb, "peak_memory_kind": peak_memory_kind(device),
        "train_flops_per_image": flops, "achieved_flops_per_s": achieved,
        "bf16_peak_flops_per_s": peak, "bf16_peak_card": card,
        "fraction_of_bf16_peak": achieved / peak if peak else None,
    }


def benchmark_sampling(model, count: int, batch: int, precision: str = "fp32",
                       sampler: str = "dpm-solver", steps: int | None = 20, eta: float = 0.0,
                       spacing: str = "auto", progress: bool = False, log=print,
                       guidance: float = 1.0) -> dict:
    """Images/s of `model.generate(count, batch_size=batch)` end to end (per-image noise
    included), after one warm-up call at the same batch size, and its peak memory (on
    CUDA: what was allocated at the start, such as resident training state, plus
    sampling's own). A conditional model draws digits 0-9 in turn with classifier-free
    guidance `guidance` (W != 0, 1: two network evaluations a step), as generate.py does.
    The result's 'images' are the samples, in [-1, 1]."""
    device = model.scheduler.betas.device
    kwargs = dict(sampler=sampler, steps=steps, eta=eta, seed=0, precision=precision,
                  spacing=spacing)

    classes = list(range(model.num_classes)) or None

    def conditioned(n: int) -> dict:
        if not model.conditional:
            return {}
        return dict(labels=labels_for(classes, n, device=device), guidance=guidance)

    warmup = min(batch, count)
    model.generate(warmup, batch_size=batch, progress=False, **kwargs, **conditioned(warmup))
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    images = model.generate(count, batch_size=batch, progress=progress, **kwargs,
                            **conditioned(count))
    _sync(device)
    seconds = time.perf_counter() - start
    nfe = model.timesteps if sampler == "ddpm" else steps
    if model.conditional and guidance not in (0, 1):
        nfe *= 2  # the conditional and the unconditional half of a doubled batch
    result = {"sampler": sampler, "sampling_nfe": nfe, "eta": eta, "precision": precision,
              "count": count, "batch": batch, "seconds": seconds,
              "images_per_s": count / seconds, "peak_memory_mb": _peak_mb(device),
              "peak_memory_kind": peak_memory_kind(device)}
    log(f"sampling ({precision}): {result['images_per_s']:,.0f} images/s ({count} digits, "
        f"{sampler}, {nfe} network evaluations each, batch {batch}, {seconds:.1f} s); "
        f"peak memory {result['peak_memory_mb']:,.0f} MB")
    return {**result, "images": images}


def run_benchmark(config: Config, progress: bool = True, warmup_steps: int | None = None,
                  timed_steps: int | None = None, sample_count: int | None = None,
                  log=print) -> dict:
    """Training, then sampling (fp32, and bf16 where the hardware computes it: CUDA, a CPU
    with AVX-512 BF16 or AMX), of the model `config` describes;
    writes OUTPUT_DIR/benchmark.json and returns the same dict."""
    device = torch.device(config.DEVICE)
    on_gpu = device.type == "cuda"
    warmup_steps = warmup_steps or (30 if on_gpu else 5)
    # on a CPU about 1,600 images, 10 to 50 steps: 50 of the preset's 32 (10 read ~10%
    # high), 13 of the default model's 128 (a minute and a half)
    cpu_steps = min(50, max(10, -(-1600 // config.BATCH_SIZE)))
    timed_steps = timed_steps or (200 if on_gpu else cpu_steps)
    sample_count = sample_count or (10_000 if on_gpu else 200)

    if dist.world_size() > 1:  # torchrun: one process alone first, as the reference
        def one_process():
            with dist.alone():
                alone = Trainer(config, progress=False, log=lambda *a: None)
                return benchmark_training(alone, warmup_steps, timed_steps, lambda *a: None)

        single = dist.broadcast_object(dist.wait_for_rank0(one_process))
    trainer = Trainer(config, progress=False, log=lambda *a: None)
    result = benchmark_training(trainer, warmup_steps, timed_steps, log)
    if dist.world_size() > 1:
        # train_step takes the global batch, split between the processes: global images/s
        result.update(world_size=dist.world_size(),
                      single_process_images_per_s=single["train_images_per_s"],
                      scaling_efficiency=result["train_images_per_s"]
                      / (dist.world_size() * single["train_images_per_s"]))
        log(f"{dist.world_size()} processes: {result['train_images_per_s']:.0f} images/s in all, "
            f"{single['train_images_per_s']:.0f} for one process alone: scaling efficiency "
            f"{100 * result['scaling_efficiency']:.0f}%")
        if not dist.is_main():
            return result
    steps = resolve(config).steps
    batch = min(sample_count, 10_000 if on_gpu else 500)
    native_bf16 = resolve_precision("auto", device) == "bf16"
    for precision in ["fp32"] + (["bf16"] if native_bf16 else []):
        sampled = benchmark_sampling(trainer.ema, sample_count, batch, precision, config.SAMPLER,
                                     steps, config.ETA, config.SPACING, progress, log,
                                     guidance=config.GUIDANCE)
        suffix = "" if precision == "fp32" else "_bf16"
        result[f"sample_images_per_s{suffix}"] = sampled["images_per_s"]
        result[f"sample_peak_memory_mb{suffix}"] = sampled["peak_memory_mb"]
        result.update(sampler=config.SAMPLER, sampling_nfe=sampled["sampling_nfe"],
                      sample_batch=batch)
    result.setdefault("sample_images_per_s_bf16", None)
    path = save_json(result, Path(config.OUTPUT_DIR) / "benchmark.json")
    log(f"wrote {path}")
    return result
