"""ONNX Runtime sessions on CPU: how many cores, which session options, and a plain run of
one graph output (for export checks and int8 judging, not speed).

Nothing here imports onnxruntime at module level: the ONNX predict path imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgtriage.bundle.graph import FEATURES_INPUT
from imgtriage.errors import require


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


# ONNX Runtime moves a QuantizeLinear up through MaxPool/Transpose/Reshape ("QDQ propagation").
# Behind the fp32 stem convolution an int8 graph keeps (predict.int8), that turns a fast fp32
# pool into a slow uint8 pool in NCHW layout: crop_cnn int8 ran at 53 CPU-ms per batch of 32
# with it, 17 without (fp32: 34). The int8 graphs place their own Quantize/Dequantize pairs.
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


def open_session(graph: bytes, options: Any) -> Any:
    """An ONNX Runtime CPU session of ``graph`` with ``options`` (:func:`session_options`),
    without the optimisers in :data:`DISABLED_OPTIMIZERS`: every session imgtriage runs."""
    ort = require("onnxruntime", "onnx")
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def run_graph(graph: bytes, x: np.ndarray, batch: int = 16, output: str = "logits",
              features: np.ndarray | None = None) -> np.ndarray:
    """One named output of an ONNX graph on ``x`` (and ``features`` for a two-input fusion
    graph); a plain session, for checks, not speed."""
    return run_outputs(graph, x, (output,), batch, features)[0]


def run_outputs(graph: bytes, x: np.ndarray, outputs: Sequence[str], batch: int = 16,
                features: np.ndarray | None = None) -> list[np.ndarray]:
    """Several named outputs of an ONNX graph from one pass over ``x`` (see :func:`run_graph`).
    """
    sess = open_session(graph, session_options(usable_cores()))
    name = sess.get_inputs()[0].name

    def feed(i: int) -> dict[str, np.ndarray]:
        d = {name: np.ascontiguousarray(x[i:i + batch])}
        if features is not None:
            d[FEATURES_INPUT] = np.ascontiguousarray(features[i:i + batch], dtype=np.float32)
        return d

    parts = [sess.run(list(outputs), feed(i)) for i in range(0, len(x), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
