"""The last step of training: give the bundle its verified ONNX graph before it is written.

Every entry point that writes a classifier bundle (``train`` and what builds on it) calls
:func:`attach_graph`, so ``predict``/``serve``/Ray/Celery run ONNX Runtime by default. The graph
is exported from a fresh CPU copy of the model holding exactly the weights the bundle stores,
and checked against torch on validation images (training images when there is no validation
split). An architecture that does not export keeps torch, and the manifest says why.

By default (``--quantize auto``) an int8 graph is calibrated on training images and judged
against fp32 on held-out validation images (``predict.int8``): it becomes the bundle's default
only when proven exact enough AND when it runs at least ``MIN_SPEEDUP`` (1.1x) fp32's speed
on this machine (timed in interleaved rounds; on tiny models quantise/dequantise overhead
can make int8 slower than fp32, and then it is only a less exact copy). ``--quantize static``
skips the speed condition (it records the ratio): for a deployment machine where int8 is
faster than on the training one. Where it cannot be judged (no validation split, fewer than
``MIN_CHECK_IMAGES`` validation images, an image + feature graph) ``auto`` does not quantise
at all and the manifest's ``onnx.int8.refused`` says why; ``--quantize static`` asks for it
explicitly (the training run refuses up front where it cannot be judged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtriage.bundle import Manifest
from imgtriage.bundle.graph import INT8_FILE, ONNX_FILE, graph_outputs
from imgtriage.data import PreprocessSpec, Sample, load_input
from imgtriage.errors import ImageReadError
from imgtriage.evaluate.ood import OOD_FILE, wants_stages
from imgtriage.models import WithFeatures, create_model
from imgtriage.predict.graph import training_graph
from imgtriage.predict.int8 import (
    MIN_CHECK_IMAGES,
    DecisionRule,
    LabelledInputs,
    quantize_checked,
)

PARITY_IMAGES = 16
CALIB_IMAGES = 64
JUDGE_IMAGES = 1000


@dataclass(frozen=True)
class GraphInputs:
    """Images for the parity check and the int8 verdict, training images to calibrate int8 on
    (None when int8 is not tried). ``held_out``: ``check`` comes from the validation split;
    int8 is judged only then (training images would overlap its calibration images)."""

    check: LabelledInputs | None
    calib: np.ndarray | None = None
    held_out: bool = True


def sample_inputs(source: Any, samples: Sequence[Sample], spec: PreprocessSpec, n: int,
                  classes: Sequence[str]) -> LabelledInputs | None:
    """Up to ``n`` labelled model inputs of a split: the decoded arrays of an in-memory
    source, or the first readable files of a streamed one (the bundle's preprocessing)."""
    x = getattr(source, "x", None)
    if x is not None and len(x):
        idx = _spread(len(x), n)
        return LabelledInputs(np.ascontiguousarray(np.asarray(x[idx], dtype=np.float32)),
                              np.asarray(source.labels)[idx])
    index = {c: i for i, c in enumerate(classes)}
    xs, ys = [], []
    for i in _spread(len(samples), len(samples)):  # every file in a seeded order
        s = samples[int(i)]
        if len(xs) >= n:
            break
        try:
            xs.append(load_input(s.path, spec)[0])
        except ImageReadError:
            continue
        ys.append(index[s.label])
    return LabelledInputs(np.stack(xs), np.asarray(ys)) if xs else None


def _spread(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` indices drawn without replacement (seeded): a split stored class by
    class still gives every class its share."""
    if total <= n:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).choice(total, n, replace=False))


def graph_inputs(train: tuple[Any, Sequence[Sample]], val: tuple[Any, Sequence[Sample]],
                 spec: PreprocessSpec, classes: Sequence[str], quantize: str) -> GraphInputs:
    """Validation images (training ones without a validation split, for the parity check
    only) and, when int8 can be judged, training images to calibrate it on."""
    held_out = val[0] is not None and len(val[0]) > 0
    n = JUDGE_IMAGES if quantize != "none" and held_out else PARITY_IMAGES
    check = sample_inputs(*(val if held_out else train), spec, n, classes)
    if quantize == "none" or not held_out or check is None or (
            quantize == "auto" and len(check.x) < MIN_CHECK_IMAGES):
        return GraphInputs(check, None, held_out)
    calib = sample_inputs(*train, spec, CALIB_IMAGES, classes)
    return GraphInputs(check, calib.x if calib is not None else None, held_out)


def attach_graph(manifest: Manifest, state_dict: dict[str, Any], inputs: GraphInputs,
                 quantize: str = "none", say: Callable[[str], None] | None = None,
                 rule_files: dict[str, bytes] | None = None
                 ) -> tuple[Manifest, dict[str, bytes]]:
    """Export the bundle's model to ``model.onnx`` (and judge an int8 copy unless
    ``quantize="none"``): the manifest with its ``onnx`` block (the graphs, or why there is
    none) and the files to save beside the weights. ``rule_files``: the files of the
    manifest's decision rule (its OOD scorer), so int8 is judged on the decisions too."""
    m = manifest.model
    model = create_model(m.name, m.num_classes, m.in_chans, **dict(m.kwargs))
    model.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=True)
    x_check = inputs.check.x[:PARITY_IMAGES] if inputs.check is not None else None
    outputs = graph_outputs(manifest)
    if "features" in outputs:  # the OOD rule reads the features of the same pass
        model = WithFeatures(model, stages=wants_stages(manifest.decision.get("ood")))
    files, info = training_graph(model.eval(), manifest, x_check, outputs)
    files = _int8(files, info, manifest, inputs, quantize, say, rule_files or {})
    return manifest.with_changes(onnx=info), files


def _int8(files: dict[str, bytes], info: dict[str, Any], manifest: Manifest,
          inputs: GraphInputs, quantize: str, say: Callable[[str], None] | None,
          rule_files: dict[str, bytes]) -> dict[str, bytes]:
    """The int8 graph beside the fp32 one when asked for (its verdict decides the default);
    ``info["int8"]`` says what happened, ``{"refused": why}`` when it was not even tried."""
    if quantize == "none" or not files:
        return files
    why, calib, check = _cannot_judge(manifest, inputs, quantize), inputs.calib, inputs.check
    if why is not None or calib is None or check is None:
        info["int8"] = {"refused": why or "no images to calibrate and judge int8 on"}
        return files
    try:
        q, verdict = quantize_checked(files[ONNX_FILE], "static", calib, check,
                                      decision_rule(manifest, rule_files),
                                      speed="require" if quantize == "auto" else "record")
    except Exception as exc:  # a quantiser failure keeps fp32, with the reason
        info["int8"] = {"refused": f"quantisation failed: {type(exc).__name__}: {exc}"[:300]}
        return files
    if say is not None:
        say(verdict.summary())
    info["int8"] = verdict.manifest_block(q)
    info["precision"] = "int8" if verdict.accepted else "fp32"
    return {**files, INT8_FILE: q}


def _cannot_judge(manifest: Manifest, inputs: GraphInputs, quantize: str) -> str | None:
    """Why int8 is not even tried (fp32 kept), or None."""
    if manifest.preprocess.get("features"):
        return ("an image + feature (fusion) graph takes two inputs; int8 calibration feeds "
                "images only")
    if not inputs.held_out:
        return ("no validation images: int8 is judged only on held-out images (give "
                "--val-frac > 0 or a val split)")
    n = 0 if inputs.check is None else len(inputs.check.x)
    if quantize == "auto" and n < MIN_CHECK_IMAGES:
        return (f"only {n} readable validation images to judge int8 on (need "
                f"{MIN_CHECK_IMAGES}); not quantised")
    if inputs.calib is None or inputs.check is None:
        return "no readable training/validation images to calibrate and judge int8 on"
    return None


def decision_rule(manifest: Manifest, files: dict[str, bytes]) -> DecisionRule:
    """The manifest's default rule, with its OOD scorer's arrays when the rule has one."""
    decision = dict(manifest.decision or {})
    name = (decision.get("ood") or {}).get("file", OOD_FILE)
    if not decision.get("ood") or name not in files:
        return DecisionRule(decision)
    from safetensors.numpy import load

    return DecisionRule(decision, load(files[name]))
