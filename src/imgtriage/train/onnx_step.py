"""The last step of training: give the bundle its verified ONNX graph before it is written.

Every entry point that writes a classifier bundle (``train`` and what builds on it) calls
:func:`attach_graph`, so ``predict``/``serve``/Ray/Celery run ONNX Runtime by default. The graph
is exported from a fresh CPU copy of the model holding exactly the weights the bundle stores,
and checked against torch on validation images (training images when there is no validation
split). An architecture that does not export keeps torch, and the manifest says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from imgtriage.bundle.graph import training_graph
from imgtriage.data import PreprocessSpec, Sample, load_input
from imgtriage.errors import ImageReadError
from imgtriage.models import create_model

CHECK_IMAGES = 16


def sample_inputs(source: Any, samples: Sequence[Sample], spec: PreprocessSpec,
                  n: int = CHECK_IMAGES) -> np.ndarray | None:
    """Up to ``n`` model inputs of a split: the decoded arrays of an in-memory source, or the
    first readable files of a streamed one (through the bundle's preprocessing)."""
    x = getattr(source, "x", None)
    if x is not None and len(x):
        return np.ascontiguousarray(np.asarray(x[:n], dtype=np.float32))
    xs = []
    for s in samples:
        if len(xs) >= n:
            break
        try:
            xs.append(load_input(s.path, spec)[0])
        except ImageReadError:
            continue
    return np.stack(xs) if xs else None


def attach_graph(manifest: dict[str, Any], state_dict: dict[str, Any],
                 x_check: np.ndarray | None) -> dict[str, bytes]:
    """Export the bundle's model to ``model.onnx``; sets ``manifest["onnx"]`` (the graph's
    block, or why there is none) and returns the files to save beside the weights."""
    m = manifest["model"]
    model = create_model(m["name"], int(m["num_classes"]), int(m["in_chans"]),
                         **dict(m.get("kwargs") or {}))
    model.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=True)
    files, manifest["onnx"] = training_graph(model.eval(), manifest, x_check)
    return files
