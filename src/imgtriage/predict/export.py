"""Export a bundle's model to ONNX (``model.onnx``) in a new bundle version, optionally with int8.

Bundles from ``imgtriage train`` already carry a verified fp32 graph (see ``predict.graph``);
this re-exports one (another opset, an older bundle) and adds int8 graphs. The export writes a
new bundle version (the old manifest stays in ``history/``) after checking that ONNX Runtime
reproduces the PyTorch probabilities within 1e-4.

int8 follows the rule in ``predict.int8``: calibrate on training images, judge on held-out
labelled images, and make int8 the default only when it is proven (accuracy drop <= 0.5
points and agreement >= 99%); otherwise fp32 stays the default and the manifest says why.
``--calib`` is a folder or a splits CSV (``RUN/splits.csv``: calibrate on its train rows, check
on its val rows); ``--check`` names the held-out images explicitly. Given only a folder, a
seeded part of it is held out for the check, never used to calibrate.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, load_bundle, update_bundle
from imgtriage.bundle.graph import INT8_FILE, ONNX_FILE, PARITY_TOLERANCE, graph_outputs
from imgtriage.errors import BundleError, ConfigError
from imgtriage.predict.backends import build_model
from imgtriage.predict.export_config import ExportConfig
from imgtriage.predict.graph import export_graph
from imgtriage.predict.int8 import DecisionRule, LabelledInputs, QuantCheck, quantize_checked
from imgtriage.predict.ood_graph import attach_ood_score
from imgtriage.predict.ort_session import run_graph, session_options, usable_cores

__all__ = ["INT8_FILE", "ONNX_FILE", "PARITY_TOLERANCE", "ExportConfig", "ExportResult",
           "QuantCheck", "export_onnx", "run_graph", "session_options", "usable_cores"]

DYNAMIC_CNN_WARNING = ("dynamic int8 quantises only MatMul/Gemm: for a CNN it is usually SLOWER "
                       "than fp32 on CPU; prefer --quantize static with --calib")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class ExportResult:
    bundle_path: Path
    parity_max_abs_dprob: float
    precision: str
    quant: QuantCheck | None
    seconds: float
    warnings: tuple[str, ...] = ()


def export_onnx(bundle: str | os.PathLike[str], config: ExportConfig | None = None, *,
                log: Callable[[str], None] | None = None, **options: Any) -> ExportResult:
    """Write ``model.onnx`` (and ``model.int8.onnx`` with ``quantize``) into a new bundle version.

    ``config`` holds the settings (``ExportConfig``, what ``imgtriage export`` builds from its
    options); or pass its fields as keywords instead.

    Example:
        >>> cfg = ExportConfig(quantize="static", calib="runs/a/splits.csv")
        >>> r = export_onnx("runs/a/bundle", cfg)  # doctest: +SKIP
        >>> r.precision, r.quant.reason  # doctest: +SKIP
        ('int8', 'agreement 99.6% >= 99%, accuracy 91.2% -> 91.0% (-0.20 points) on 500 ...')
    """
    if config is not None and options:
        raise ConfigError("export_onnx takes an ExportConfig or its fields as keywords, not "
                          f"both (got config and {sorted(options)})")
    cfg = config if config is not None else ExportConfig(**options)
    quantize, calib, opset = cfg.quantize, cfg.calib, cfg.opset
    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    b = load_bundle(bundle)
    if b.info.kind == "gallery":
        raise ConfigError(f"{b.path} is a gallery bundle: it carries its encoder's verified "
                          "ONNX graph from the moment it is made (the manifest's 'onnx'), and "
                          "predict/serve run it; a gallery saved without one gets it from "
                          "`imgtriage gallery create BUNDLE DATA -o NEW`")
    if b.info.kind != "classifier":
        raise ConfigError(f"{b.path} is a {b.info.kind!r} bundle; export the "
                          "classifier bundles it contains instead")
    if b.info.preprocess.get("features") and quantize:
        raise ConfigError(f"{b.path} is an image + feature (fusion) model: its graph takes two "
                          "inputs, and int8 calibration feeds images only; export fp32 "
                          "(drop --quantize)")
    sets = (_calib_and_check(b, calib, cfg.check, cfg.calib_images, cfg.check_images, say)
            if calib else None)
    try:
        ood = bool(b.info.decision.get("ood"))
        g = export_graph(build_model(b, with_features=ood), b.info,
                         sets[1].x[:16] if sets else None, opset=opset,
                         outputs=graph_outputs(b.info))
    except BundleError as exc:
        raise BundleError(f"{b.path}: {exc}") from exc
    graph, info, parity = g.data, dict(g.info), float(g.info["parity_max_abs_dprob"])
    say(f"fp32 graph: {len(graph) / 1e6:.1f} MB, max |Δprob| vs torch {parity:.2e}")
    files = {ONNX_FILE: graph}
    notes: list[str] = []
    result: QuantCheck | None = None
    if quantize and sets is not None:
        if quantize == "dynamic":
            warnings.warn(DYNAMIC_CNN_WARNING, stacklevel=2)
            notes.append(DYNAMIC_CNN_WARNING)
            say(f"warning: {DYNAMIC_CNN_WARNING}")
        q, result = quantize_checked(graph, quantize, sets[0].x, sets[1], _rule(b))
        say(result.summary())
        files[INT8_FILE] = q
        info["int8"] = result.manifest_block(q)
        info["precision"] = "int8" if result.accepted else "fp32"
    else:
        old_int8 = (b.info.block("onnx") or {}).get("int8")
        if old_int8 and b.has_file(old_int8.get("file", INT8_FILE)):
            info["int8"] = old_int8  # same weights: the earlier int8 graph and verdict stay
            info["precision"] = "int8" if old_int8.get("accepted") else "fp32"
    rule = b.info.decision.get("ood") or {}
    if rule.get("file") and b.has_file(rule["file"]):  # the OOD score joins the new graphs
        scored, files = attach_ood_score(b.info.with_changes(onnx=info), {
            **files, rule["file"]: b.verified_bytes(rule["file"])},
            sets[1].x[:16] if sets else None, say)
        info = dict(scored.block("onnx"))
    note = f"onnx export (opset {opset}" + (f", int8 {quantize})" if quantize else ")")
    new = update_bundle(b.path, {"onnx": info}, note=note, extra_files=files, out=cfg.out)
    return ExportResult(new.path, parity, info["precision"], result,
                        time.perf_counter() - t0, tuple(notes))


def _rule(b: Bundle) -> DecisionRule:
    """The bundle's default decision rule (and its OOD scorer's arrays): int8 must decide the
    same as fp32 under it."""
    decision = dict(b.info.decision or {})
    name = (decision.get("ood") or {}).get("file")
    if name and b.has_file(name):
        return DecisionRule(decision, b.tensors(name, "numpy"))
    return DecisionRule(decision)


# -- images for calibration and checks ------------------------------------------------------
def _reservoir(items: Any, k: int, seed: int = 0) -> list[Any]:
    """``k`` items drawn uniformly from a stream (memory stays k, whatever the folder holds)."""
    rng = np.random.default_rng(seed)
    keep: list[Any] = []
    for i, p in enumerate(items):
        if i < k:
            keep.append(p)
        else:
            j = int(rng.integers(0, i + 1))
            if j < k:
                keep[j] = p
    return sorted(keep)


def _labelled_paths(source: str | os.PathLike[str], split: str | None, flag: str
                    ) -> list[tuple[str, str]] | Any:
    """``(path, label)`` of a folder (label: the parent folder's name) or of a CSV/JSONL
    manifest's rows (only ``split``'s rows when the manifest has a split column)."""
    from imgtriage.data.discovery import discover, iter_image_files

    root = Path(source)
    if root.is_dir():
        return ((str(p), Path(p).parent.name) for p in iter_image_files(root))
    if root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
        samples = discover(root).samples
        if split is not None and any(s.split for s in samples):
            samples = [s for s in samples if s.split == split]
        return [(s.path, s.label) for s in samples]
    raise ConfigError(f"{root} is neither a folder nor a CSV/JSONL manifest ({flag})")


def _calib_and_check(b: Bundle, calib: str | os.PathLike[str],
                     check: str | os.PathLike[str] | None, n_calib: int, n_check: int,
                     say: Callable[[str], None]) -> tuple[LabelledInputs, LabelledInputs]:
    """Calibration images (training rows) and disjoint held-out check images."""
    is_manifest = Path(calib).suffix.lower() in MANIFEST_SUFFIXES
    cal = _reservoir(_labelled_paths(calib, "train", "--calib"), n_calib if check or
                     is_manifest else n_calib + n_check)
    if check is not None or is_manifest:
        held = _reservoir(_labelled_paths(check or calib, "val", "--check"), n_check)
        used = {p for p, _ in cal}
        held = [(p, lab) for p, lab in held if p not in used]
        where = f"{check or calib}" + ("" if check else " (val rows)")
    else:  # one folder: a seeded part is held out, never calibrated on
        order = np.random.default_rng(1).permutation(len(cal))
        k = min(n_calib, len(cal) // 2)
        cal, held = [cal[i] for i in order[:k]], [cal[i] for i in order[k:]]
        where = f"{calib} (held out from calibration)"
    cx = _load(b, cal, "--calib", calib)
    hx = _load(b, held, "--check", check or calib)
    say(f"calibration: {len(cx.x)} images from {calib}; check: {len(hx.x)} held-out images "
        f"from {where}")
    return cx, hx


def _load(b: Bundle, items: list[tuple[str, str]], flag: str, where: Any) -> LabelledInputs:
    """Images through the bundle's own preprocessing; labels when every one names a class."""
    from imgtriage.data.preprocess import PreprocessSpec, load_input
    from imgtriage.errors import ImageReadError

    spec = PreprocessSpec.from_dict(dict(b.info.preprocess))
    index = {c: i for i, c in enumerate(b.classes)}
    xs, labels = [], []
    for path, label in items:
        try:
            xs.append(load_input(path, spec)[0])
        except ImageReadError:
            continue
        labels.append(index.get(label, -1))
    if not xs:
        raise ConfigError(f"no readable images in {where} for {flag}; it needs real images like "
                          "the ones the model will see")
    y = np.asarray(labels)
    return LabelledInputs(np.stack(xs), y if (y >= 0).all() else None)
