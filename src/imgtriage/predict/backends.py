"""Inference backends: a callable ``(N, C, h, w) float32 -> (N, K) logits`` over a bundle."""

from __future__ import annotations

import numpy as np
import torch

from imgtriage.bundle import Bundle, build_model
from imgtriage.errors import ConfigError


class TorchBackend:
    """Eager PyTorch on ``device``; inference mode, no autograd."""

    name = "torch"

    def __init__(self, bundle: Bundle, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = build_model(bundle).to(self.device)

    @torch.inference_mode()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
        return out.float().cpu().numpy()


def make_backend(bundle: Bundle, backend: str = "auto", device: str = "cpu"):
    """``auto`` picks ONNX Runtime on CPU when the bundle holds a graph, else torch."""
    if backend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"backend must be auto, torch or onnx, got {backend!r} (--backend)")
    has_onnx = bundle.has_file("model.onnx")
    if backend == "onnx" or (backend == "auto" and has_onnx and device == "cpu"):
        if not has_onnx:
            raise ConfigError(f"{bundle.path} has no model.onnx; run `imgtriage export "
                              f"{bundle.path} --onnx` first or use --backend torch")
        from imgtriage.predict.onnx_backend import OnnxBackend

        return OnnxBackend(bundle)
    return TorchBackend(bundle, device)
