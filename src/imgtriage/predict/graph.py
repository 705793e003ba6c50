"""The fp32 ONNX graph of a bundle's model: export, parity check, and the manifest block.

Every training entry point that writes a classifier bundle calls :func:`training_graph`, so a
bundle carries a verified ``model.onnx`` from the start and ``predict``/``serve``/Ray/Celery run
ONNX Runtime without a separate ``imgtriage export`` step. When an architecture cannot be
exported faithfully, the bundle keeps the torch backend and its ``onnx`` block says why
(:func:`imgtriage.bundle.graph.not_exported`).

Design: the graph computes the model only. Its input is exactly what
:func:`imgtriage.data.preprocess.to_input` returns (scaled, resized *and normalised*), so every
backend shares the one preprocessing function; the graph carries the preprocessing block in its
metadata (``imgtriage.preprocess``) for tools outside imgtriage. The names a graph uses and the
manifest records live in :mod:`imgtriage.bundle.graph` (data only).

Nothing here imports torch or onnx at module level.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtriage.bundle.graph import (
    DEFAULT_OPSET,
    FEATURES_INPUT,
    FIRST_OUTPUTS,
    GRAPH_OUTPUTS,
    INPUT_NAME,
    ONNX_FILE,
    PARITY_TOLERANCE,
    not_exported,
    num_features,
)
from imgtriage.bundle.record import Manifest
from imgtriage.bundle.store import sha256_bytes
from imgtriage.errors import BundleError, ConfigError, require
from imgtriage.predict.ort_session import run_graph, softmax


def _pick(model: Any, x: Any, outputs: tuple[str, ...], f: Any = None) -> tuple[Any, ...]:
    out = model(x) if f is None else model(x, f)
    out = out if isinstance(out, tuple) else (out,)
    if max(GRAPH_OUTPUTS[n] for n in outputs) >= len(out):
        raise ConfigError(f"graph outputs {list(outputs)} need a model returning (logits, "
                          "features): wrap it in imgtriage.models.WithFeatures")
    return tuple(out[GRAPH_OUTPUTS[n]] for n in outputs)


@dataclass(frozen=True)
class Graph:
    """An exported, parity-checked graph and the manifest's ``onnx`` block describing it."""

    data: bytes
    info: dict[str, Any]
    seconds: float


def export_graph(model: Any, manifest: Manifest, x_check: np.ndarray | None, *,
                 opset: int = DEFAULT_OPSET, outputs: Sequence[str] = ("logits",)) -> Graph:
    """Export ``model`` (eval mode, CPU) to ONNX and check ONNX Runtime against torch.

    ``x_check``: real model inputs (validation images through the bundle's preprocessing);
    None uses random inputs. Raises :class:`BundleError` when the probabilities differ by more
    than ``PARITY_TOLERANCE``.

    Example:
        >>> g = export_graph(model, bundle.info, x_val[:16])  # doctest: +SKIP
        >>> g.info["parity_max_abs_dprob"] <= 1e-4  # doctest: +SKIP
        True
    """
    import torch

    t0 = time.perf_counter()
    unknown = [o for o in outputs if o not in GRAPH_OUTPUTS]
    if not outputs or outputs[0] not in FIRST_OUTPUTS or unknown:
        raise ConfigError(f"graph outputs must start with 'logits' (or 'embedding') and be "
                          f"among {sorted(GRAPH_OUTPUTS)}, got {list(outputs)}")
    pre = manifest.preprocess
    if x_check is None or len(x_check) == 0:
        shape = (int(pre["in_chans"]), *(int(s) for s in pre["size"]))
        x_check = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    x_check = np.ascontiguousarray(x_check, dtype=np.float32)
    nf = num_features(manifest)  # fusion: standardised rows are ~N(0, 1); random ones check
    f_check = None if nf is None else np.random.default_rng(1).standard_normal(
        (len(x_check), nf)).astype(np.float32)
    model = model.eval()
    graph = _with_metadata(_torch_to_onnx(
        model, torch.from_numpy(x_check[:2]), opset, tuple(outputs),
        None if f_check is None else torch.from_numpy(f_check[:2])), manifest)
    parity = _parity(model, graph, x_check, tuple(outputs), f_check)
    if not parity <= PARITY_TOLERANCE:
        raise BundleError(f"ONNX Runtime's probabilities differ from PyTorch's by {parity:.2e} "
                          f"(> {PARITY_TOLERANCE}) on {len(x_check)} check images; this "
                          "architecture does not export faithfully: keep using --backend torch")
    info = {"file": ONNX_FILE, "sha256": sha256_bytes(graph), "opset": opset,
            "input": INPUT_NAME, "output": outputs[0], "outputs": list(outputs),
            "inputs": [INPUT_NAME] + ([FEATURES_INPUT] if nf is not None else []),
            "dynamic_batch": True,
            "input_is": "normalised output of imgtriage.data.preprocess.to_input",
            "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
            "parity_max_abs_dprob": parity, "parity_images": len(x_check),
            "precision": "fp32", "int8": None}
    return Graph(graph, info, time.perf_counter() - t0)


def training_graph(model: Any, manifest: Manifest, x_check: np.ndarray | None,
                   outputs: Sequence[str] = ("logits",)
                   ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``(extra files, onnx block)`` for a bundle being written by a training entry point.

    Never raises for an architecture that will not export: the bundle then runs on torch and
    the block says why (``{"file": None, "reason": ...}``), which ``predict`` prints.
    """
    try:
        g = export_graph(model, manifest, x_check, outputs=outputs)
    except Exception as exc:  # any exporter or runtime failure keeps torch, with the reason
        return {}, not_exported(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return {ONNX_FILE: g.data}, {**g.info, "export_seconds": round(g.seconds, 3)}


def _torch_to_onnx(model: Any, sample: Any, opset: int, outputs: tuple[str, ...],
                   f_sample: Any = None) -> bytes:
    import torch

    class _Outputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any, f: Any = None) -> Any:
            outs = _pick(self.inner, x, outputs, f)
            return outs[0] if len(outs) == 1 else outs

    buf = io.BytesIO()
    inputs = [INPUT_NAME] + ([FEATURES_INPUT] if f_sample is not None else [])
    args = (sample,) if f_sample is None else (sample, f_sample)
    axes = {name: {0: "batch"} for name in (*inputs, *outputs)}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(_Outputs(model).eval(), args, buf, dynamo=False,
                          input_names=inputs, output_names=list(outputs),
                          opset_version=opset, dynamic_axes=axes, do_constant_folding=True)
    return buf.getvalue()


def _parity(model: Any, graph: bytes, x: np.ndarray, outputs: tuple[str, ...],
            f: np.ndarray | None = None) -> float:
    """Max |Δprobability| on the logits; every extra output must match to 1e-3 relative."""
    import torch

    with torch.inference_mode():
        xt, ft = torch.from_numpy(x), None if f is None else torch.from_numpy(f)
        refs = {name: v.float().numpy()
                for name, v in zip(outputs, _pick(model, xt, outputs, ft), strict=True)}
    first = outputs[0]
    got0 = run_graph(graph, x, output=first, features=f)
    # logits: compare probabilities; an embedding (unit length): compare the values
    parity = float(np.abs(softmax(refs[first]) - softmax(got0)).max() if first == "logits"
                   else np.abs(refs[first] - got0).max())
    for name in outputs[1:]:
        got = run_graph(graph, x, output=name, features=f)
        scale = max(1.0, float(np.abs(refs[name]).max()))
        if float(np.abs(got - refs[name]).max()) > 1e-3 * scale:
            raise BundleError(f"ONNX output {name!r} differs from PyTorch's")
    return parity


def _with_metadata(graph: bytes, manifest: Manifest) -> bytes:
    """Record preprocessing and classes in the graph, for consumers outside imgtriage."""
    onnx = require("onnx", "onnx")
    proto = onnx.load_from_string(graph)
    meta = {"imgtriage.preprocess": json.dumps(dict(manifest.preprocess)),
            "imgtriage.classes": json.dumps(list(manifest.classes)),
            "imgtriage.input": "normalised (x - mean) / std, (N, C, h, w) float32; see "
                               "imgtriage.preprocess"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()
