"""Stand-ins for a DiffusionModel's UNet that run it another way, with the same call.

Each is a `torch.nn.Module` whose forward(x, timesteps, labels) returns what the UNet
would (up to float rounding), so it can replace `model.unet` and the samplers, guidance
and per-image noise all run unchanged:

    model.unet = onnxruntime_unet(model, "unet.onnx", threads=2)
    images = model.generate(1000, labels=labels, **settings.sample_kwargs())

- `ChannelsLastUNet`: the UNet with channels_last weights and inputs.
- `export_onnx`: the UNet as an ONNX file with a dynamic batch axis (torch.export-based
  exporter, else the TorchScript one).
- `OnnxRuntimeUNet` / `onnxruntime_unet`: that file run by an onnxruntime InferenceSession.
- `OpenVinoUNet` / `openvino_unet`: that file compiled by OpenVINO for the CPU.

onnxruntime and openvino are optional (not in requirements.txt): they are imported by
the functions that need them, and `NotInstalled` says which one is missing.
`python -m scripts.speed` measures all of these against the plain UNet.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from torch import nn


class NotInstalled(ImportError):
    """An optional package this stand-in needs cannot be imported; args[0] names it."""


def require(package: str):
    """The optional `package`, imported; NotInstalled names it if it cannot be."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise NotInstalled(package) from None


class ChannelsLastUNet(nn.Module):
    """`unet` converted to channels_last, fed channels_last inputs; outputs are returned
    contiguous (NCHW), as the plain UNet's."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.unet(x.contiguous(memory_format=torch.channels_last), timesteps, labels)
        return out.contiguous()


def example_inputs(model, batch: int = 2) -> tuple:
    """(x, t, labels) of `batch` images for `model` (a DiffusionModel); labels only if
    the model is class-conditional. The noise is seeded: the same in every process."""
    x = torch.randn(batch, *model.image_shape, generator=torch.Generator().manual_seed(0))
    t = torch.arange(batch, dtype=torch.long) * (model.timesteps // batch)
    if not model.conditional:
        return x, t
    return x, t, torch.arange(batch, dtype=torch.long) % model.num_classes


def export_onnx(model, path) -> str:
    """Write `model.unet` (a DiffusionModel's) to `path` as ONNX: inputs x (B, C, H, W)
    float32, t (B,) int64 and, for a conditional model, labels (B,) int64; output out.
    B is dynamic. Returns which exporter worked: 'dynamo' (torch.export-based, needs
    onnxscript) or 'torchscript' (the legacy one, tried when the first fails)."""
    args = example_inputs(model)
    names = ["x", "t", "labels"][:len(args)]
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)
    unet = model.unet.eval()
    try:
        torch.onnx.export(unet, args, str(path), input_names=names, output_names=["out"],
                          dynamic_shapes=dynamic, dynamo=True, verbose=False)
        return "dynamo"
    except Exception as first:  # noqa: BLE001 - onnxscript missing, an op it cannot translate
        try:
            torch.onnx.export(unet, args, str(path), input_names=names, output_names=["out"],
                              dynamic_axes={n: {0: "batch"} for n in [*names, "out"]},
                              dynamo=False)
            return "torchscript"
        except Exception:  # noqa: BLE001
            raise first from None


def _numpy_inputs(x, timesteps, labels, num_classes: int) -> dict:
    """The ONNX graph's inputs: labels None means "no class" (the null token)."""
    inputs = {"x": x.detach().float().contiguous().numpy(),
              "t": timesteps.detach().to(torch.long).numpy()}
    if num_classes:
        if labels is None:
            labels = torch.full((x.shape[0],), num_classes, dtype=torch.long)
        if labels.is_floating_point():
            raise ValueError("this exported UNet takes class indices, not class weights")
        inputs["labels"] = labels.detach().to(torch.long).numpy()
    return inputs


class OnnxRuntimeUNet(nn.Module):
    """An ONNX UNet (`export_onnx`) run by onnxruntime on the CPU with `threads`
    intra-op threads; tensors go in and out through numpy (on the CPU, no copy)."""

    def __init__(self, path, num_classes: int, threads: int = 2):
        super().__init__()
        ort = require("onnxruntime")  # optional: not in requirements.txt
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        inputs = _numpy_inputs(x, timesteps, labels, self.num_classes)
        return torch.from_numpy(self.session.run(None, inputs)[0]).to(x.device)


class OpenVinoUNet(nn.Module):
    """An ONNX UNet (`export_onnx`) compiled by OpenVINO for the CPU in fp32 (its
    default on CPUs with bf16 units would be bf16), with `threads` inference threads."""

    def __init__(self, path, num_classes: int, threads: int = 2):
        super().__init__()
        ov = require("openvino")  # optional: not in requirements.txt
        core = ov.Core()
        compiled = core.compile_model(ov.convert_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY"})
        self.request = compiled.create_infer_request()
        self.output = compiled.outputs[0]
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        inputs = _numpy_inputs(x, timesteps, labels, self.num_classes)
        out = self.request.infer(inputs)[self.output]  # a copy: the next call reuses buffers
        return torch.from_numpy(np.asarray(out)).to(x.device)


def onnxruntime_unet(model, path, threads: int = 2) -> OnnxRuntimeUNet:
    """`model.unet` exported to `path` (if not there yet) and run by onnxruntime."""
    require("onnxruntime")
    if not Path(path).is_file():
        export_onnx(model, path)
    return OnnxRuntimeUNet(path, model.num_classes, threads)


def openvino_unet(model, path, threads: int = 2) -> OpenVinoUNet:
    """`model.unet` exported to `path` (if not there yet) and compiled by OpenVINO."""
    require("openvino")
    if not Path(path).is_file():
        export_onnx(model, path)
    return OpenVinoUNet(path, model.num_classes, threads)
