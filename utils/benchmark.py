"""`python main.py --benchmark`: training and sampling speed on this machine, as JSON.

Measures, for the model and settings the flags describe: training images/s after
warm-up (the real training step: in-memory batches, autocast, fused AdamW, EMA),
sampling images/s with the configured sampler, peak memory, the FLOPs of one
training step per image (counted by torch's FlopCounterMode) and the FLOP/s they
imply, as a fraction of the card's dense bf16 peak where the card is known.
A benchmark, not a test: numbers depend on the machine and on what else runs.
"""
from __future__ import annotations

import platform
import resource
import time
from pathlib import Path

import torch

from config import Config

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


def training_flops_per_image(trainer, x0: torch.Tensor) -> float:
    """FLOPs of forward + backward of the loss, per image (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = trainer.model.compute_loss(x0, generator=torch.Generator(x0.device).manual_seed(0))
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x0.shape[0]


def run_benchmark(config: Config, progress: bool = True, warmup_steps: int | None = None,
                  timed_steps: int | None = None, sample_count: int | None = None,
                  log=print) -> dict:
    from utils.metrics import save_json
    from utils.trainer import Trainer

    device = torch.device(config.DEVICE)
    on_gpu = device.type == "cuda"
    warmup_steps = warmup_steps or (30 if on_gpu else 3)
    timed_steps = timed_steps or (200 if on_gpu else 10)
    sample_count = sample_count or (10_000 if on_gpu else 200)
    trainer = Trainer(config, progress=False, log=lambda *a: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    batches = _endless(trainer)

    flops = training_flops_per_image(trainer, next(batches))
    log(f"benchmark on {device}: {sum(p.numel() for p in trainer.params) / 1e6:.2f}M parameters, "
        f"batch {config.BATCH_SIZE}, {trainer.precision}, "
        f"{'compiled' if config.COMPILE else 'eager'}; {flops / 1e9:.3f} GFLOP per training image")
    start = time.perf_counter()
    for _ in range(warmup_steps):
        trainer.train_step(next(batches))
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    images = 0
    for _ in range(timed_steps):
        x0 = next(batches)
        trainer.train_step(x0)
        images += x0.shape[0]
    _sync(device)
    train_seconds = time.perf_counter() - start
    train_rate = images / train_seconds
    log(f"training: {train_rate:,.0f} images/s ({timed_steps} steps after {warmup_steps} warm-up "
        f"steps that took {warmup_seconds:.1f} s)")

    steps = None if config.SAMPLER == "ddpm" else config.SAMPLING_STEPS
    nfe = steps or config.TIMESTEPS
    batch = min(sample_count, 10_000 if on_gpu else 500)
    sample_rates = {}
    for precision in (["fp32", "bf16"] if on_gpu else ["fp32"]):
        kwargs = dict(sampler=config.SAMPLER, steps=steps, eta=config.ETA, seed=0,
                      precision=precision, spacing=config.SPACING)
        trainer.ema.generate(min(batch, 64), batch_size=batch, progress=False, **kwargs)  # warm-up
        _sync(device)
        start = time.perf_counter()
        trainer.ema.generate(sample_count, batch_size=batch, progress=progress, **kwargs)
        _sync(device)
        sample_rates[precision] = sample_count / (time.perf_counter() - start)
        log(f"sampling ({precision}): {sample_rates[precision]:,.0f} images/s ({sample_count} "
            f"digits, {config.SAMPLER}, {nfe} network evaluations each, batch {batch})")
    sample_rate = sample_rates["fp32"]

    if on_gpu:
        peak_bytes = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = platform.processor() or platform.machine()
    achieved = flops * train_rate
    card, peak = _peak_for(name) if on_gpu else (None, None)
    result = {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in trainer.params),
        "batch_size": config.BATCH_SIZE, "precision": trainer.precision,
        "channels_last": config.CHANNELS_LAST, "compile": config.COMPILE,
        "model_channels": config.MODEL_CHANNELS, "channel_mult": list(config.CHANNEL_MULT),
        "num_res_blocks": config.NUM_RES_BLOCKS, "attention": config.ATTENTION,
        "train_images_per_s": train_rate, "train_seconds_per_epoch": len(trainer.batcher) * config.BATCH_SIZE / train_rate,
        "warmup_seconds": warmup_seconds,
        "sampler": config.SAMPLER, "sampling_nfe": nfe, "sample_images_per_s": sample_rate,
        "sample_images_per_s_bf16": sample_rates.get("bf16"),
        "sample_batch": batch,
        "peak_memory_mb": peak_bytes / 2 ** 20,
        "peak_memory_kind": "cuda max_memory_allocated" if on_gpu else "process max RSS",
        "train_flops_per_image": flops, "achieved_flops_per_s": achieved,
        "bf16_peak_flops_per_s": peak, "bf16_peak_card": card,
        "fraction_of_bf16_peak": achieved / peak if peak else None,
    }
    path = save_json(result, Path(config.OUTPUT_DIR) / "benchmark.json")
    log(f"peak memory {result['peak_memory_mb']:,.0f} MB ({result['peak_memory_kind']}); "
        f"{achieved / 1e12:.3f} TFLOP/s achieved in training"
        + (f" = {100 * result['fraction_of_bf16_peak']:.1f}% of the {card}'s bf16 peak" if peak else "")
        + f"\nwrote {path}")
    return result


def _endless(trainer):
    epoch = 0
    while True:
        yield from trainer.batcher.batches(epoch)
        epoch += 1
