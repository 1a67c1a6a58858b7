"""The GPU paths: training steps, exact resume, fast paths and samplers on CUDA, and a
checkpoint written on CUDA that loads and samples on the CPU.

Skipped without CUDA, but always collected, so an import or fixture error shows up on
every machine. `python -m scripts.gpu_report` runs this file on a GPU (about a minute,
most of it compiling); so does `python -m pytest tests/test_cuda.py` there.
"""
import os

# cuBLAS is bit-for-bit repeatable only with a fixed workspace; set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from models import DiffusionModel  # noqa: E402
from utils import checkpoint as ckpt  # noqa: E402
from utils.data_loader import InMemoryBatcher  # noqa: E402
from training.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SAMPLERS = [("ddpm", None, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0),
            ("dpm-solver", 10, 0.0), ("dpm-solver", 10, 1.0)]


def quiet(*args, **kwargs):
    pass


def _train(config, resume=None) -> Trainer:
    trainer = Trainer(config, resume=resume, progress=False, log=quiet)
    trainer.fit()
    return trainer


@pytest.fixture
def deterministic():
    """Deterministic kernels for the duration of a test: cuDNN's, and attention's math path
    (the fused attention backward adds in a varying order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    with sdpa_kernel(SDPBackend.MATH):
        yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
    torch.use_deterministic_algorithms(before[2])


@pytest.fixture
def full_fp32():
    """No TF32 in convolutions and matrix products: fp32 means fp32 for the duration."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def sampling_model(timesteps: int = 50) -> DiffusionModel:
    """A tiny CUDA model whose zero-initialised layers are made random (non-trivial output)."""
    torch.manual_seed(0)
    model = DiffusionModel(timesteps=timesteps, model_channels=8, time_embed_dim=16,
                           num_res_blocks=1, attention=True)
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.cuda().eval()


def test_training_steps_on_cuda_in_bf16_with_fused_adamw_and_device_batches(tiny):
    trainer = _train(tiny(DEVICE="cuda", MAX_STEPS=6))
    assert trainer.precision == "bf16"  # 'auto' on CUDA
    assert trainer.optimizer.defaults["fused"] is True
    assert isinstance(trainer.batcher, InMemoryBatcher)
    assert trainer.batcher.images.is_cuda and next(trainer.batcher.batches(0)).is_cuda
    assert all(p.is_cuda for p in trainer.model.parameters())
    assert trainer.step == 6 and len(trainer.losses) == 6
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    fresh = DiffusionModel.from_config(trainer.config).cuda()
    moved = [not torch.equal(a, b) for a, b in zip(fresh.parameters(), trainer.model.parameters())]
    assert sum(moved) > len(moved) // 2  # the steps changed the weights


@pytest.mark.parametrize("stop_at", [3, 6])  # mid-epoch; in the second epoch
def test_resume_is_exact_on_cuda(tiny, tmp_path, deterministic, stop_at):
    """N steps in one run == k steps, save, load, N - k steps (tests/test_training.py on CUDA)."""
    from config import Config
    from config import config_for_resume

    total = 9
    straight = _train(tiny(DEVICE="cuda", MAX_STEPS=total, CHECKPOINT_DIR=str(tmp_path / "a")))
    again = _train(tiny(DEVICE="cuda", MAX_STEPS=total, CHECKPOINT_DIR=str(tmp_path / "c")))
    assert again.losses == straight.losses, "two identical CUDA runs differ: not deterministic"
    first = _train(tiny(DEVICE="cuda", MAX_STEPS=stop_at, CHECKPOINT_DIR=str(tmp_path / "b")))
    state = ckpt.load_checkpoint(first.checkpoint_dir / ckpt.LATEST)
    config = config_for_resume(Config.from_dict(state["config"]), {"MAX_STEPS": total})
    resumed = _train(config, resume=state)
    assert resumed.step == straight.step == total
    assert resumed.losses == straight.losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("changes", [dict(CHANNELS_LAST=True), dict(COMPILE=True)],
                         ids=["channels-last", "compile"])
def test_fast_training_steps_track_eager_fp32_on_cuda(tiny, changes):
    """--channels-last and --compile give the eager fp32 losses (tests/test_fast_paths.py on
    CUDA). Not bit for bit: cuDNN picks other (TF32) convolution kernels for them."""
    base = dict(DEVICE="cuda", PRECISION="fp32", MAX_STEPS=4, DROPOUT=0.0)
    plain = _train(tiny(**base))
    fast = _train(tiny(**base, **changes))
    assert fast.losses == pytest.approx(plain.losses, rel=2e-3)


@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS, ids=[f"{s}-eta{e:g}" for s, _, e in SAMPLERS])
def test_samplers_on_cuda_in_fp32_and_bf16(sampler, steps, eta):
    model = sampling_model()
    devices = []
    alpha_bar = model.scheduler.alpha_bar

    def recording(t):  # every timestep tensor a sampler builds should already be on the GPU
        devices.append(t.device.type)
        return alpha_bar(t)

    model.scheduler.alpha_bar = recording
    images = {precision: model.generate(8, batch_size=8, progress=False, sampler=sampler,
                                        steps=steps, eta=eta, seed=1, precision=precision)
              for precision in ("fp32", "bf16")}
    for precision, x in images.items():
        assert x.is_cuda and x.shape == (8, 1, 28, 28), precision
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1, precision
        assert x.std() > 0.05, precision  # not collapsed to a constant
    difference = (images["bf16"] - images["fp32"]).abs()
    assert difference.mean() < 0.01, difference.mean()  # ~5e-4 on a CPU
    assert set(devices) <= {"cuda"}, set(devices)


@pytest.mark.parametrize("sampler,steps,eta", SAMPLERS, ids=[f"{s}-eta{e:g}" for s, _, e in SAMPLERS])
def test_per_image_seeds_do_not_depend_on_batch_size_on_cuda(sampler, steps, eta, full_fp32):
    model = sampling_model()
    kwargs = dict(progress=False, sampler=sampler, steps=steps, eta=eta, seed=3)
    whole = model.generate(6, batch_size=6, **kwargs)
    pieces = model.generate(6, batch_size=4, **kwargs)
    # other batch sizes may take other convolution kernels: equal up to fp32 rounding
    assert torch.allclose(whole, pieces, atol=1e-4), (whole - pieces).abs().max()
    other = model.generate(6, batch_size=6, **{**kwargs, "seed": 4})
    assert (whole - other).abs().mean() > 0.1


def test_checkpoint_written_on_cuda_loads_and_samples_on_cpu(tiny, full_fp32):
    trainer = _train(tiny(DEVICE="cuda", MAX_STEPS=3))
    path = trainer.checkpoint_dir / ckpt.LATEST
    model, config = DiffusionModel.from_checkpoint(path, device="cpu")
    assert config.DEVICE == "cuda" and next(model.parameters()).device.type == "cpu"
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t), trainer.ema.unet(x.cuda(), t.cuda()).cpu(),
                              atol=1e-4)
    on_cpu = model.sample((2, 1, 28, 28), sampler="dpm-solver", steps=5, seed=1)
    on_gpu = trainer.ema.sample((2, 1, 28, 28), sampler="dpm-solver", steps=5, seed=1)
    assert on_cpu.device.type == "cpu" and torch.isfinite(on_cpu).all()
    assert torch.allclose(on_cpu, on_gpu.cpu(), atol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_runs_on_a_fused_sdpa_kernel(precision):
    """With only the fused kernels allowed, attention still runs: its q, k, v qualify."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.unet import AttentionBlock

    block = AttentionBlock(128, num_heads=4).cuda()  # the default model's bottom: 4 heads of 32
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # zero-initialised: make attention count
    x = torch.randn(8, 128, 7, 7, device="cuda")
    with torch.no_grad():
        reference = block(x)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                fused = block(x)
    assert torch.allclose(fused.float(), reference, atol=0.05)
