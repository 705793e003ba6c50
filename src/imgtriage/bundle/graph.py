"""What a bundle records about its ONNX graphs, as data: file and tensor names, the outputs a
manifest asks for, and the manifest's ``onnx`` block when there is no graph.

Exporting a model, checking parity and running graphs are above this layer
(``predict.graph``, ``predict.ort_session``, ``predict.int8``): ``bundle`` builds no model
and runs no inference. Every training entry point that writes a classifier bundle calls
:func:`imgtriage.predict.graph.training_graph`, so a bundle carries a verified ``model.onnx``
from the start; when an architecture cannot be exported faithfully, the bundle keeps the torch
backend and its ``onnx`` block says why (:func:`not_exported`).

Outputs are named, and runtimes ask for them by name (``session.run(["logits"], ...)``), so a
second output (e.g. the penultimate features for an OOD scorer) is one entry in
:data:`GRAPH_OUTPUTS` plus its name in ``outputs=``; the manifest lists what a graph holds in
``onnx.outputs``.
"""

from __future__ import annotations

from typing import Any

from imgtriage.bundle.record import Manifest

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
# The OOD score computed inside the graph from its "features" output (predict/ood_graph.py):
# one session run gives logits and score. Not a torch output: appended after export.
OOD_SCORE_OUTPUT = "ood_score"
# The fields of an OOD rule that change the score (the threshold is applied outside the graph).
OOD_SCORE_KEYS = ("method", "k", "scale", "file")


def graph_outputs(manifest: Manifest) -> tuple[str, ...]:
    """The outputs a bundle's graph needs: the logits, and the features when its decision rule
    refuses out-of-distribution inputs (export then takes ``WithFeatures(model)``)."""
    return ("logits", "features") if manifest.decision.get("ood") else ("logits",)


def ood_score_record(rule: dict[str, Any], file_sha256: str) -> dict[str, Any]:
    """What the ``onnx`` block says about a graph's ``ood_score`` output: the rule fields and
    the hash of the OOD file it was built from (so a changed scorer is never scored stale)."""
    return {**{k: rule.get(k) for k in OOD_SCORE_KEYS}, "sha256": file_sha256}


def graph_scores_rule(info: dict[str, Any] | None, files: dict[str, str],
                      rule: dict[str, Any] | None) -> bool:
    """Whether the bundle's graphs compute exactly ``rule``'s OOD score: their head was built
    from the same method, k, scale and OOD file (by hash) as the rule asks for. A rule from
    an edited profile or a bundle written before in-graph scores reads False: the caller
    scores the ``features`` output itself.

    Example:
        >>> rule = {"method": "knn", "k": 10, "scale": None, "file": "ood.safetensors"}
        >>> info = {"ood_score": ood_score_record(rule, "ab12")}
        >>> graph_scores_rule(info, {"ood.safetensors": "ab12"}, rule)
        True
        >>> graph_scores_rule(info, {"ood.safetensors": "ab12"}, {**rule, "k": 5})
        False
    """
    rec = (info or {}).get("ood_score")
    if not isinstance(rec, dict) or not rule or rec.get("sha256") is None:
        return False
    return (files.get(str(rule.get("file"))) == rec["sha256"]
            and all(rec.get(k) == rule.get(k) for k in OOD_SCORE_KEYS))


def num_features(manifest: Manifest) -> int | None:
    """Feature columns of an image + feature model's second input (None: image only)."""
    if not manifest.preprocess.get("features"):
        return None
    return int(manifest.model.kwargs["num_features"])


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
