"""Inference backends: a callable ``(N, C, h, w) float32 -> (N, K) logits`` over a bundle.

Each backend has ``name``, ``precision``, ``threads`` and ``batch_size`` (the batch it runs
best at, used when the caller does not choose one). :func:`choose_runtime` decides which
backend and graph a bundle runs with (and why), without loading anything, so the CLI can say it
before a long run and :func:`make_backend` can never decide differently.

torch is imported only when the torch backend is built: the ONNX path starts without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle
from imgtriage.bundle.graph import FEATURES_INPUT, ONNX_FILE
from imgtriage.errors import BundleError, ConfigError
from imgtriage.predict.ort_session import usable_cores

BACKENDS = ("auto", "torch", "onnx")


@dataclass(frozen=True)
class RuntimeChoice:
    """Which backend and precision a bundle runs with, on how many threads, and why.

    Example:
        >>> print(RuntimeChoice("onnx", "fp32", 2, "the bundle's verified graph").line())
        backend onnx, precision fp32, 2 threads (the bundle's verified graph)
    """

    backend: str
    precision: str
    threads: int | None
    note: str = ""

    def line(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" \
            if self.threads else "default threads"
        return (f"backend {self.backend}, precision {self.precision}, {threads}"
                + (f" ({self.note})" if self.note else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "threads": self.threads,
                "runtime_note": self.note}


def choose_runtime(bundle: Bundle, backend: str = "auto", device: str = "cpu", *,
                   num_threads: int | None = None, precision: str | None = None
                   ) -> RuntimeChoice:
    """``auto`` picks ONNX Runtime on CPU when the bundle holds a graph, else torch.

    ``precision`` (fp32|int8) chooses between the ONNX graphs; default: the bundle's choice
    (int8 only where its check accepted it).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be auto, torch or onnx, got {backend!r} (--backend)")
    if num_threads is not None and num_threads < 1:
        raise ConfigError("num_threads must be >= 1 (--threads)")
    info = bundle.info.block("onnx") or {}
    has_onnx = bundle.has_file(ONNX_FILE)
    if bundle.info.model.name == "onnx":  # an imported graph: no torch weights
        if backend == "torch":
            raise ConfigError(f"{bundle.path} holds an imported ONNX graph and no PyTorch "
                              "weights; use --backend onnx (or auto)")
        backend = "onnx"
    fusion_graph = FEATURES_INPUT in (info.get("inputs") or [])
    if backend == "onnx" and bundle.info.preprocess.get("features") and not fusion_graph:
        raise ConfigError(f"{bundle.path} is an image + feature model whose graph predates "
                          "two-input export; use --backend torch (or auto), or retrain")
    if backend == "onnx" or (backend == "auto" and has_onnx and device == "cpu"):
        if not has_onnx:
            raise ConfigError(f"{bundle.path} has no model.onnx; run `imgtriage export "
                              f"{bundle.path} --onnx` first or use --backend torch")
        from imgtriage.predict.onnx_backend import onnx_file_for

        _, chosen = onnx_file_for(bundle, precision)
        return RuntimeChoice("onnx", chosen, num_threads or usable_cores(),
                             _onnx_note(info, chosen, precision))
    if precision not in (None, "fp32"):
        raise ConfigError(f"precision {precision!r} needs the ONNX backend; the torch backend "
                          "runs fp32 (--precision)")
    if backend == "torch":
        note = "asked for"
    elif device != "cpu":
        note = f"device {device}"
    else:
        note = f"no ONNX graph: {info.get('reason') or 'exported before graphs were default'}"
    return RuntimeChoice("torch", "fp32", num_threads or usable_cores(), note)


def _onnx_note(info: dict[str, Any], chosen: str, asked: str | None) -> str:
    if asked is not None:
        return "asked for"
    int8 = info.get("int8") or {}
    if chosen == "int8":
        return f"int8 accepted: {int8['accepted']}" if int8.get("accepted") else \
            "int8 chosen at export"
    if int8.get("refused"):
        return f"int8 refused: {int8['refused']}"
    return "the bundle's verified graph"


class TorchBackend:
    """Eager PyTorch on ``device``; inference mode, no autograd.

    Weights and image batches use the channels_last memory format: the same numbers,
    1.1-1.7x faster convolutions on CPU (oneDNN) and CUDA (bench/bench_channels_last.py).
    """

    name = "torch"
    precision = "fp32"
    batch_size = 32
    has_ood_score = False  # the OOD score is computed from with_features in NumPy

    def __init__(self, bundle: Bundle, device: str = "cpu",
                 num_threads: int | None = None) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.threads = torch.get_num_threads()
        self.device = torch.device(device)
        self.model = build_model(bundle).to(self.device, memory_format=torch.channels_last)
        self._tap: Any = None
        self._stages = stages_wanted(bundle)

    def _args(self, x: np.ndarray, features: np.ndarray | None) -> list[Any]:
        import torch

        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        if xt.ndim == 4:
            xt = xt.contiguous(memory_format=torch.channels_last)
        if features is None:
            return [xt]
        return [xt, torch.from_numpy(np.ascontiguousarray(features)).to(self.device)]

    def __call__(self, x: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Logits; ``features`` (N, F) go to image + feature (fusion) models."""
        import torch

        with torch.inference_mode():
            return self.model(*self._args(x, features)).float().cpu().numpy()

    def with_features(self, x: np.ndarray, features: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and penultimate features (then the stage statistics where the bundle's OOD
        rule reads them) from one forward pass (for OOD scores)."""
        import torch

        from imgtriage.models import WithFeatures

        if self._tap is None:
            self._tap = WithFeatures(self.model, stages=self._stages)
        with torch.inference_mode():
            logits, feats = self._tap(*self._args(x, features))
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()


def make_backend(bundle: Bundle, backend: str = "auto", device: str = "cpu", *,
                 num_threads: int | None = None, precision: str | None = None) -> Any:
    """The backend :func:`choose_runtime` picks for ``bundle``."""
    choice = choose_runtime(bundle, backend, device, num_threads=num_threads,
                            precision=precision)
    return build_backend(bundle, choice, device, num_threads)


def build_backend(bundle: Bundle, choice: RuntimeChoice, device: str = "cpu",
                  num_threads: int | None = None) -> Any:
    """Load the backend a :class:`RuntimeChoice` names."""
    if choice.backend == "onnx":
        from imgtriage.predict.onnx_backend import OnnxBackend

        return OnnxBackend(bundle, num_threads=num_threads, precision=choice.precision)
    return TorchBackend(bundle, device, num_threads)


def reference_backend(bundle: Bundle) -> str:
    """The backend that gives a bundle's exact fp32 answers for fitting rules on (a cascade's
    gate, calibration): torch where the bundle has weights, ONNX for an imported graph."""
    return "onnx" if bundle.info.model.name == "onnx" else "torch"


def check_shapes(bundle: Bundle, state: dict[str, Any], make: Any) -> None:
    """The architecture the manifest describes, built on the meta device (no memory), must
    hold exactly the tensors of the weights file, before a real one is allocated: a manifest
    asking for widths of 10**6 is refused here instead of exhausting memory."""
    import torch

    try:
        with torch.device("meta"):
            probe = make()
    except Exception:  # an architecture that cannot be built on meta: the real build checks
        return
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want == have:
        return
    diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
    key = diff[0]
    raise BundleError(f"{bundle.path}: the manifest's architecture {bundle.info.model.name!r} "
                      f"does not fit the weights ({len(diff)} tensors differ, e.g. {key!r}: "
                      f"architecture {want.get(key)}, weights {have.get(key)}); the manifest "
                      "or the weights were altered: use the original bundle")


def stages_wanted(bundle: Bundle) -> bool:
    """Whether the bundle's OOD rule reads stage statistics after the penultimate features
    (``knn+rmd+stages``): every features tap of its model (torch, the exported graph) then
    appends them."""
    from imgtriage.evaluate.ood import wants_stages

    return wants_stages(bundle.info.decision.get("ood"))


def build_model(bundle: Bundle, *, with_features: bool = False):
    """Instantiate the bundle's architecture and load its verified weights (eval mode);
    ``with_features`` returns ``(logits, features)`` from one forward pass: the penultimate
    features, then the stage statistics where the OOD rule reads them (:func:`stages_wanted`).

    This is where a bundle (data) becomes a network: above ``bundle``, which never builds one.
    """
    from imgtriage.models import WithFeatures, create_model

    m = bundle.info.model
    if m.name == "onnx":
        raise BundleError(f"{bundle.path} holds an imported ONNX graph (model.onnx) and no "
                          "PyTorch weights: run it with the ONNX backend; torch-only tools "
                          "(export, attribution) do not apply to it")
    state = bundle.state_dict()
    check_shapes(bundle, state, lambda: create_model(m.name, m.num_classes, m.in_chans,
                                                      **dict(m.kwargs)))
    model = create_model(m.name, m.num_classes, m.in_chans, **dict(m.kwargs))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.path}: weights do not fit architecture {m.name!r}: "
                          f"{str(exc).splitlines()[0]}") from exc
    if with_features:
        return WithFeatures(model, stages=stages_wanted(bundle)).eval()
    return model.eval()
