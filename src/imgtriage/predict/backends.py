"""Inference backends: a callable ``(N, C, h, w) float32 -> (N, K) logits`` over a bundle.

Each backend has ``name`` and ``batch_size`` (the batch it runs best at, used when the caller
does not choose one).
"""

from __future__ import annotations

import numpy as np
import torch

from imgtriage.bundle import Bundle, build_model
from imgtriage.errors import ConfigError

BACKENDS = ("auto", "torch", "onnx")


class TorchBackend:
    """Eager PyTorch on ``device``; inference mode, no autograd.

    Weights and image batches use the channels_last memory format: the same numbers,
    1.1-1.7x faster convolutions on CPU (oneDNN) and CUDA (bench/bench_channels_last.py).
    """

    name = "torch"
    precision = "fp32"
    batch_size = 32

    def __init__(self, bundle: Bundle, device: str = "cpu",
                 num_threads: int | None = None) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device(device)
        self.model = build_model(bundle).to(self.device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Logits; ``features`` (N, F) go to image + feature (fusion) models."""
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if xt.ndim == 4:
            xt = xt.contiguous(memory_format=torch.channels_last)
        if features is None:
            out = self.model(xt)
        else:
            out = self.model(xt, torch.from_numpy(np.ascontiguousarray(features)).to(self.device))
        return out.float().cpu().numpy()


def make_backend(bundle: Bundle, backend: str = "auto", device: str = "cpu", *,
                 num_threads: int | None = None, precision: str | None = None):
    """``auto`` picks ONNX Runtime on CPU when the bundle holds a graph, else torch.

    ``precision`` (fp32|int8) chooses between the ONNX graphs; default: the bundle's choice.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be auto, torch or onnx, got {backend!r} (--backend)")
    has_onnx = bundle.has_file("model.onnx")
    if backend == "onnx" and bundle.manifest["preprocess"].get("features"):
        raise ConfigError(f"{bundle.path} is an image + feature model, which runs on the torch "
                          "backend only; use --backend torch (or auto)")
    if backend == "onnx" or (backend == "auto" and has_onnx and device == "cpu"):
        if not has_onnx:
            raise ConfigError(f"{bundle.path} has no model.onnx; run `imgtriage export "
                              f"{bundle.path} --onnx` first or use --backend torch")
        from imgtriage.predict.onnx_backend import OnnxBackend

        return OnnxBackend(bundle, num_threads=num_threads, precision=precision)
    if precision not in (None, "fp32"):
        raise ConfigError(f"precision {precision!r} needs the ONNX backend; the torch backend "
                          "runs fp32 (--precision)")
    return TorchBackend(bundle, device, num_threads)
