"""Export a bundle's model to ONNX (``model.onnx``), optionally with an int8 copy.

Design: the graph computes the model only. Its input is exactly what
:func:`imgtriage.data.preprocess.to_input` returns: scaled, resized *and normalised* with the
bundle's mean/std. Putting the normalisation in the graph as well would apply it twice, and
feeding the graph un-normalised data would need a second preprocessing path that could drift.
So there is one preprocessing function for every backend, and the graph carries the
preprocessing block in its metadata (``imgtriage.preprocess``) for tools outside imgtriage.

The export writes a new bundle version (the old manifest stays in ``history/``) after checking
that ONNX Runtime reproduces the PyTorch probabilities within 1e-4. Quantisation:

- ``static``: int8 QDQ, per-channel weights, activations calibrated on images from a folder.
  About 2x fp32 speed for CNNs on AVX2.
- ``dynamic``: only MatMul/Gemm are quantised; for CNNs it is *slower* than fp32 (a warning
  says so). Meant for transformer-style models.

Both print top-1 agreement, max |Δprobability| and (for class folders) accuracy against fp32.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle.graph import (
    INT8_FILE,
    ONNX_FILE,
    PARITY_TOLERANCE,
    export_graph,
    run_graph,
    session_options,
    softmax,
    usable_cores,
)
from imgtriage.bundle.store import Bundle, build_model, load_bundle, sha256_bytes, update_bundle
from imgtriage.errors import BundleError, ConfigError, require

__all__ = ["INT8_FILE", "ONNX_FILE", "PARITY_TOLERANCE", "ExportResult", "QuantCheck",
           "export_onnx", "quant_check", "run_graph", "session_options", "usable_cores"]
QUANT_MODES = ("static", "dynamic")
DYNAMIC_CNN_WARNING = ("dynamic int8 quantises only MatMul/Gemm: for a CNN it is usually SLOWER "
                       "than fp32 on CPU; prefer --quantize static with --calib")


@dataclass(frozen=True)
class QuantCheck:
    """How the int8 graph compares with the fp32 graph on the check images."""

    mode: str
    n_images: int
    agreement: float
    max_abs_dprob: float
    accuracy_fp32: float | None = None
    accuracy_int8: float | None = None

    def summary(self) -> str:
        text = (f"int8 {self.mode} vs fp32 on {self.n_images} images: top-1 agreement "
                f"{self.agreement:.1%}, max |Δprob| {self.max_abs_dprob:.4f}")
        if self.accuracy_fp32 is not None:
            text += (f", accuracy fp32 {self.accuracy_fp32:.1%} / int8 "
                     f"{self.accuracy_int8:.1%}")
        return text


@dataclass(frozen=True)
class ExportResult:
    bundle_path: Path
    parity_max_abs_dprob: float
    precision: str
    quant: QuantCheck | None
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Images:
    x: np.ndarray  # (N, C, h, w) model inputs
    labels: np.ndarray | None  # class ids, or None when the folder has no class names


def export_onnx(bundle: str | os.PathLike[str], *, quantize: str | None = None,
                calib: str | os.PathLike[str] | None = None, calib_images: int = 64,
                opset: int = 17, out: str | os.PathLike[str] | None = None,
                log: Callable[[str], None] | None = None) -> ExportResult:
    """Write ``model.onnx`` (and ``model.int8.onnx`` with ``quantize``) into a new bundle version.

    Example:
        >>> r = export_onnx("runs/a/bundle", quantize="static", calib="data/val")  # doctest: +SKIP
        >>> r.quant.agreement > 0.98  # doctest: +SKIP
        True
    """
    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    _check_args(quantize, calib, calib_images)
    b = load_bundle(bundle)
    if b.manifest.get("kind", "classifier") != "classifier":
        raise ConfigError(f"{b.path} is a {b.manifest.get('kind')!r} bundle; export the "
                          "classifier bundles it contains instead")
    if b.manifest["preprocess"].get("features"):
        raise ConfigError(f"{b.path} is an image + feature (fusion) model; ONNX export of "
                          "two-input models is not supported yet: predict with --backend torch")
    images = _load_images(b, calib, calib_images, say) if calib else None
    try:
        g = export_graph(build_model(b), b.manifest, images.x[:16] if images else None,
                         opset=opset)
    except BundleError as exc:
        raise BundleError(f"{b.path}: {exc}") from exc
    graph, info, parity = g.data, dict(g.info), float(g.info["parity_max_abs_dprob"])
    say(f"fp32 graph: {len(graph) / 1e6:.1f} MB, max |Δprob| vs torch {parity:.2e}")
    files = {ONNX_FILE: graph}
    notes: list[str] = []
    if quantize:
        if quantize == "dynamic":
            warnings.warn(DYNAMIC_CNN_WARNING, stacklevel=2)
            notes.append(DYNAMIC_CNN_WARNING)
            say(f"warning: {DYNAMIC_CNN_WARNING}")
        if images is None:  # pragma: no cover - _check_args requires --calib with --quantize
            raise ConfigError("--quantize needs --calib DIR")
        q = _quantize(graph, quantize, images)
        check = quant_check(graph, q, images, quantize)
        say(check.summary())
        files[INT8_FILE] = q
        info["int8"] = {"file": INT8_FILE, "sha256": sha256_bytes(q), **asdict(check)}
        info["precision"] = "int8"
    else:
        check = None
        old_int8 = (b.manifest.get("onnx") or {}).get("int8")
        if old_int8 and b.has_file(old_int8.get("file", INT8_FILE)):
            info["int8"] = old_int8  # same weights: the earlier int8 graph stays valid
    note = f"onnx export (opset {opset}" + (f", int8 {quantize})" if quantize else ")")
    new = update_bundle(b.path, {"onnx": info}, note=note, extra_files=files, out=out)
    return ExportResult(new.path, parity, info["precision"], check,
                        time.perf_counter() - t0, tuple(notes))


def _check_args(quantize: str | None, calib: Any, calib_images: int) -> None:
    if quantize is not None and quantize not in QUANT_MODES:
        raise ConfigError(f"quantize must be static or dynamic, got {quantize!r} (--quantize)")
    if quantize and calib is None:
        raise ConfigError("int8 quantisation needs a folder of real images to calibrate on and "
                          "to check accuracy against fp32: pass --calib DIR (e.g. the "
                          "validation images)")
    if calib_images < 1:
        raise ConfigError("calib_images must be >= 1 (--calib-images)")


def _softmax(z: np.ndarray) -> np.ndarray:
    return softmax(z)


# -- images for calibration and checks ------------------------------------------------------
def _reservoir(paths: Any, k: int, seed: int = 0) -> list[str]:
    """``k`` paths drawn uniformly from a stream (memory stays k, whatever the folder holds)."""
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    for i, p in enumerate(paths):
        if i < k:
            keep.append(str(p))
        else:
            j = int(rng.integers(0, i + 1))
            if j < k:
                keep[j] = str(p)
    return sorted(keep)


def _load_images(b: Bundle, folder: str | os.PathLike[str], n: int,
                 say: Callable[[str], None]) -> _Images:
    """Up to ``n`` images from ``folder`` through the bundle's own preprocessing; a file's parent
    folder named like a class gives its label (for the accuracy check)."""
    from imgtriage.data.discovery import iter_image_files
    from imgtriage.data.preprocess import PreprocessSpec, load_input
    from imgtriage.errors import ImageReadError

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"calibration folder {root} does not exist or is not a folder (--calib)")
    spec = PreprocessSpec.from_dict(b.manifest["preprocess"])
    index = {c: i for i, c in enumerate(b.classes)}
    xs, labels, bad = [], [], 0
    for p in _reservoir(iter_image_files(root), n):
        try:
            xs.append(load_input(p, spec)[0])
        except ImageReadError:
            bad += 1
            continue
        labels.append(index.get(Path(p).parent.name, -1))
    if not xs:
        raise ConfigError(f"no readable images in {root} ({bad} unreadable); --calib needs "
                          "real images like the ones the model will see")
    say(f"calibration: {len(xs)} images from {root}" + (f" ({bad} unreadable, skipped)"
                                                         if bad else ""))
    y = np.asarray(labels)
    return _Images(np.stack(xs), y if (y >= 0).all() else None)


# -- quantisation -----------------------------------------------------------------------------
class _Reader:
    """ONNX Runtime calibration reader over preprocessed images, 8 per batch."""

    def __init__(self, x: np.ndarray, name: str = "input", batch: int = 8) -> None:
        self._batches = iter([{name: np.ascontiguousarray(x[i:i + batch])}
                              for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(graph: bytes, mode: str, images: _Images) -> bytes:
    """int8 copy of ``graph``: static QDQ per-channel (calibrated on ``images``) or dynamic."""
    q = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="imgtriage-quant-") as tmp:
        src, prep, dst = (Path(tmp) / n for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        src.write_bytes(graph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(prep))
            if mode == "static":
                # U8 activations x S8 per-channel weights; reduce_range keeps AVX2 (no VNNI)
                # from saturating its 16-bit intermediate sums.
                q.quantize_static(str(prep), str(dst), _Reader(images.x),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True,
                                  reduce_range=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8,
                                  calibrate_method=q.CalibrationMethod.MinMax)
            else:
                q.quantize_dynamic(str(prep), str(dst), per_channel=True, reduce_range=True,
                                   weight_type=q.QuantType.QInt8)
        return dst.read_bytes()


def quant_check(fp32: bytes, int8: bytes, images: _Images, mode: str) -> QuantCheck:
    """Agreement of the int8 graph with the fp32 one (and accuracy when labels are known)."""
    p32, p8 = _softmax(run_graph(fp32, images.x)), _softmax(run_graph(int8, images.x))
    top32, top8 = p32.argmax(1), p8.argmax(1)
    acc32 = acc8 = None
    if images.labels is not None:
        acc32 = float((top32 == images.labels).mean())
        acc8 = float((top8 == images.labels).mean())
    return QuantCheck(mode, len(images.x), float((top32 == top8).mean()),
                      float(np.abs(p32 - p8).max()), acc32, acc8)
