"""The fp32 ONNX graph of a bundle's model: export, parity check, and the manifest block.

Every training entry point that writes a classifier bundle calls :func:`training_graph`, so a
bundle carries a verified ``model.onnx`` from the start and ``predict``/``serve``/Ray/Celery run
ONNX Runtime without a separate ``imgtriage export`` step. When an architecture cannot be
exported faithfully, the bundle keeps the torch backend and its ``onnx`` block says why
(``{"file": None, "reason": ...}``).

Design: the graph computes the model only. Its input is exactly what
:func:`imgtriage.data.preprocess.to_input` returns (scaled, resized *and normalised*), so every
backend shares the one preprocessing function; the graph carries the preprocessing block in its
metadata (``imgtriage.preprocess``) for tools outside imgtriage.

Outputs are named, and runtimes ask for them by name (``session.run(["logits"], ...)``), so a
second output (e.g. the penultimate features for an OOD scorer) is one entry in
:data:`GRAPH_OUTPUTS` plus its name in ``outputs=``; the manifest lists what a graph holds in
``onnx.outputs``.

Nothing here imports torch or onnx at module level: the ONNX predict path imports this module.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtriage.bundle.store import sha256_bytes
from imgtriage.errors import BundleError, ConfigError, require

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAME = "input"
# The second input of an image + feature (fusion) model's graph: the standardised feature rows
# (not "features": that name is the penultimate-features *output* of OOD graphs).
FEATURES_INPUT = "header_features"
PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17

# Output name -> its position in what the torch model returns: a plain classifier returns the
# logits; imgtriage.models.WithFeatures(model) returns (logits, penultimate features), both from
# one forward pass (what an OOD rule needs). The first entry is the one every runtime uses.
GRAPH_OUTPUTS: dict[str, int] = {"logits": 0, "features": 1, "embedding": 0}
# What a graph's first output may be: a classifier's logits, or a gallery encoder's embedding.
FIRST_OUTPUTS = ("logits", "embedding")


def graph_outputs(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The outputs a bundle's graph needs: the logits, and the features when its decision rule
    refuses out-of-distribution inputs (export then takes ``WithFeatures(model)``)."""
    return ("logits", "features") if (manifest.get("decision") or {}).get("ood") else ("logits",)


def num_features(manifest: dict[str, Any]) -> int | None:
    """Feature columns of an image + feature model's second input (None: image only)."""
    if not (manifest.get("preprocess") or {}).get("features"):
        return None
    return int(((manifest.get("model") or {}).get("kwargs") or {})["num_features"])


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


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int, *, spinning: bool = False) -> Any:
    """ONNX Runtime SessionOptions for CPU: ``threads`` intra-op threads, every graph
    optimisation, no thread spinning unless asked (decoding threads share the cores)."""
    ort = require("onnxruntime", "onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def run_graph(graph: bytes, x: np.ndarray, batch: int = 16, output: str = "logits",
              features: np.ndarray | None = None) -> np.ndarray:
    """One named output of an ONNX graph on ``x`` (and ``features`` for a two-input fusion
    graph); a plain session, for checks, not speed."""
    ort = require("onnxruntime", "onnx")
    sess = ort.InferenceSession(graph, session_options(usable_cores()),
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def feed(i: int) -> dict[str, np.ndarray]:
        d = {name: np.ascontiguousarray(x[i:i + batch])}
        if features is not None:
            d[FEATURES_INPUT] = np.ascontiguousarray(features[i:i + batch], dtype=np.float32)
        return d

    return np.concatenate([sess.run([output], feed(i))[0] for i in range(0, len(x), batch)])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def export_graph(model: Any, manifest: dict[str, Any], x_check: np.ndarray | None, *,
                 opset: int = DEFAULT_OPSET, outputs: Sequence[str] = ("logits",)) -> Graph:
    """Export ``model`` (eval mode, CPU) to ONNX and check ONNX Runtime against torch.

    ``x_check``: real model inputs (validation images through the bundle's preprocessing);
    None uses random inputs. Raises :class:`BundleError` when the probabilities differ by more
    than ``PARITY_TOLERANCE``.

    Example:
        >>> g = export_graph(model, manifest, x_val[:16])  # doctest: +SKIP
        >>> g.info["parity_max_abs_dprob"] <= 1e-4  # doctest: +SKIP
        True
    """
    import torch

    t0 = time.perf_counter()
    unknown = [o for o in outputs if o not in GRAPH_OUTPUTS]
    if not outputs or outputs[0] not in FIRST_OUTPUTS or unknown:
        raise ConfigError(f"graph outputs must start with 'logits' (or 'embedding') and be "
                          f"among {sorted(GRAPH_OUTPUTS)}, got {list(outputs)}")
    pre = manifest["preprocess"]
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


def training_graph(model: Any, manifest: dict[str, Any], x_check: np.ndarray | None,
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


def not_exported(reason: str) -> dict[str, Any]:
    """The manifest's ``onnx`` block of a bundle without a graph (predicts with torch)."""
    return {"file": None, "precision": None, "reason": reason}


def graph_summary(info: dict[str, Any] | None) -> str:
    """One line for training summaries: which backend the bundle will predict with, and why."""
    if not info:
        return "predicts with torch (no ONNX graph)"
    if not info.get("file"):
        return f"predicts with torch: ONNX export failed ({info.get('reason', 'unknown')})"
    text = (f"predicts with ONNX Runtime {info.get('precision', 'fp32')} (fp32 graph: max "
            f"|Δprob| vs torch {info['parity_max_abs_dprob']:.1e} on "
            f"{info.get('parity_images', '?')} images)")
    int8 = info.get("int8") or {}
    if int8.get("accepted"):
        text += f"; int8 accepted: {int8['accepted']}"
    elif int8.get("refused"):
        text += f"; int8 refused, fp32 kept: {int8['refused']}"
    return text


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


def _with_metadata(graph: bytes, manifest: dict[str, Any]) -> bytes:
    """Record preprocessing and classes in the graph, for consumers outside imgtriage."""
    onnx = require("onnx", "onnx")
    proto = onnx.load_from_string(graph)
    meta = {"imgtriage.preprocess": json.dumps(manifest["preprocess"]),
            "imgtriage.classes": json.dumps(list(manifest["classes"])),
            "imgtriage.input": "normalised (x - mean) / std, (N, C, h, w) float32; see "
                               "imgtriage.preprocess"}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()
