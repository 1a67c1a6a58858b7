"""The fast training paths give the plain path's loss; 'auto' precision is bf16 where the
hardware computes it; the benchmark writes valid JSON.

bf16 autocast and channels_last run on the CPU too; torch.compile takes minutes to
compile on a 2-core CPU, so its test runs on CUDA or when MNIST_DIFFUSION_SLOW_TESTS=1.
"""
import json
import os

import pytest
import torch

from models import DiffusionModel
from training.benchmark import benchmark_sampling, run_benchmark
from training.trainer import Trainer

SLOW = os.environ.get("MNIST_DIFFUSION_SLOW_TESTS") == "1"
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _setup(device):
    torch.manual_seed(0)
    model = DiffusionModel(timesteps=50, model_channels=8, time_embed_dim=16, num_res_blocks=1).to(device)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(8, 1, 28, 28, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, 50, (8,), generator=g).to(device)
    noise = torch.randn(8, 1, 28, 28, generator=g).to(device)
    with torch.no_grad():  # make the zero-initialised layers non-zero so outputs differ
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05, generator=None)
    return model, x0, t, noise


@pytest.mark.parametrize("device", devices)
def test_bf16_autocast_loss_matches_fp32(device):
    model, x0, t, noise = _setup(device)
    plain = model.compute_loss(x0, t, noise)
    with torch.autocast(device, dtype=torch.bfloat16):
        fast = model.compute_loss(x0, t, noise)
    assert fast.dtype == torch.float32  # the loss itself is reduced in fp32
    assert fast.item() == pytest.approx(plain.item(), rel=0.03)


@pytest.mark.parametrize("device", devices)
def test_channels_last_loss_matches(device):
    model, x0, t, noise = _setup(device)
    plain = model.compute_loss(x0, t, noise)
    model.unet.to(memory_format=torch.channels_last)
    fast = model.compute_loss(x0.contiguous(memory_format=torch.channels_last), t, noise)
    assert fast.item() == pytest.approx(plain.item(), rel=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() or SLOW),
                    reason="compiling takes minutes on a CPU; set MNIST_DIFFUSION_SLOW_TESTS=1")
@pytest.mark.parametrize("device", devices)
def test_compiled_loss_and_gradients_match(device):
    model, x0, t, noise = _setup(device)
    plain = model.compute_loss(x0, t, noise)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.unet.compile()
    fast = model.compute_loss(x0, t, noise)
    fast.backward()
    assert fast.item() == pytest.approx(plain.item(), rel=1e-4)
    for a, p in zip(grads, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("changes", [dict(PRECISION="bf16"), dict(CHANNELS_LAST=True)])
def test_fast_training_steps_track_the_plain_ones(tiny, changes):
    plain = Trainer(tiny(MAX_STEPS=4, DROPOUT=0.0, PRECISION="fp32"), progress=False,
                    log=lambda *a: None)
    plain.fit()
    fast = Trainer(tiny(MAX_STEPS=4, DROPOUT=0.0, **changes), progress=False, log=lambda *a: None)
    fast.fit()
    tolerance = 0.03 if changes.get("PRECISION") == "bf16" else 1e-4
    assert fast.losses == pytest.approx(plain.losses, rel=tolerance)


@pytest.mark.parametrize("capabilities, native", [
    ({"avx512_bf16": True, "amx_bf16": False}, True), ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx2": True, "avx512_f": True}, False), (AttributeError, False)])
def test_native_bf16_reads_the_cpus_capabilities(monkeypatch, capabilities, native):
    from utils import machine

    def report():
        if capabilities is AttributeError:  # a torch without torch.cpu.get_capabilities
            raise AttributeError("get_capabilities")
        return capabilities
    monkeypatch.setattr(torch.cpu, "get_capabilities", report)
    assert machine.native_bf16() is native


def test_auto_precision_is_bf16_where_the_hardware_computes_it(monkeypatch, tiny):
    from sampling.settings import resolve_precision
    from utils import machine

    monkeypatch.setattr(machine, "native_bf16", lambda: True)
    assert [resolve_precision("auto", d) for d in ("cpu", "cuda", "cuda:1", "meta")] == \
        ["bf16", "bf16", "bf16", "fp32"]
    assert Trainer(tiny(), progress=False, log=lambda *a: None).precision == "bf16"
    assert Trainer(tiny(PRECISION="fp32"), progress=False, log=lambda *a: None).precision == "fp32"
    monkeypatch.setattr(machine, "native_bf16", lambda: False)
    assert [resolve_precision("auto", d) for d in ("cpu", "cuda")] == ["fp32", "bf16"]
    assert Trainer(tiny(), progress=False, log=lambda *a: None).precision == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"


def test_benchmark_runs_on_cpu_and_writes_json(tiny):
    config = tiny(SAMPLING_STEPS=3)
    result = run_benchmark(config, progress=False, warmup_steps=1, timed_steps=2, sample_count=4,
                           log=lambda *a: None)
    from pathlib import Path

    data = json.loads((Path(config.OUTPUT_DIR) / "benchmark.json").read_text())
    for key in ("train_images_per_s", "sample_images_per_s", "train_peak_memory_mb",
                "sample_peak_memory_mb", "train_flops_per_image", "achieved_flops_per_s"):
        assert data[key] > 0, key
        assert data[key] == pytest.approx(result[key])
    # a forward + backward pass costs about three forwards
    from torch.utils.flop_counter import FlopCounterMode

    model = DiffusionModel.from_config(config)
    with FlopCounterMode(display=False) as counter:
        model.unet(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    forward = counter.get_total_flops() / 2
    assert 2.5 * forward < data["train_flops_per_image"] < 3.5 * forward
    assert data["fraction_of_bf16_peak"] is None  # unknown for a CPU
    from sampling.settings import resolve_precision  # bf16 sampling too where the CPU computes it
    assert (data["sample_images_per_s_bf16"] is not None) == (resolve_precision("auto", "cpu") == "bf16")


def test_sampling_benchmark_warms_up_at_the_timed_batch_size():
    model = DiffusionModel(timesteps=20, model_channels=8, time_embed_dim=16, num_res_blocks=1)
    calls = []
    generate = model.generate

    def recording(num_samples, batch_size=500, **kwargs):
        calls.append((num_samples, batch_size))
        return generate(num_samples, batch_size=batch_size, **kwargs)

    model.generate = recording
    result = benchmark_sampling(model, count=12, batch=6, steps=3, log=lambda *a: None)
    assert calls == [(6, 6), (12, 6)]  # one full batch of warm-up, then the timed run
    assert result["images"].shape == (12, 1, 28, 28) and result["images_per_s"] > 0


def test_attention_feeds_sdpa_contiguous_heads_and_matches_plain_attention(monkeypatch):
    """q, k, v reach scaled_dot_product_attention with a unit last-dimension stride (else
    CUDA falls back to the math path), and the block equals attention written out."""
    from models.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=4)
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # zero-initialised: make it count
    x = torch.randn(2, 16, 7, 7)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.extend(t.stride(-1) for t in (q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        out = block(x)
    assert seen == [1, 1, 1]
    with torch.no_grad():  # the same attention by hand: heads of 4 channels over 49 pixels
        qkv = block.qkv(block.norm(x)).reshape(2, 3, 4, 4, 49)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, C/heads, HW)
        weights = torch.softmax(q.transpose(-1, -2) @ k / 2.0, dim=-1)  # scale 1/sqrt(4)
        plain = x + block.proj((v @ weights.transpose(-1, -2)).reshape(2, 16, 7, 7))
    assert torch.allclose(out, plain, atol=1e-5)


def test_benchmark_flag_on_the_command_line(tmp_path, data_dir):
    import main

    out = tmp_path / "out"
    code = main.main(["--benchmark", "--model-channels", "8", "--time-embed-dim", "16",
                      "--num-res-blocks", "1", "--timesteps", "20", "--sampling-steps", "2",
                      "--batch-size", "8", "--train-size", "64", "--device", "cpu",
                      "--data-dir", str(data_dir), "--no-download", "--quiet",
                      "--output-dir", str(out), "--checkpoint-dir", str(tmp_path / "ck")])
    assert code == 0
    assert json.loads((out / "benchmark.json").read_text())["batch_size"] == 8
    assert not (tmp_path / "ck" / "latest.pt").exists()  # a benchmark trains nothing to keep
