"""``imgtriage import``: wrap a model trained elsewhere into an ordinary bundle.

Two sources:

- an **ONNX file** (what Keras/TF, PyTorch and most tools export to): the graph is wrapped to
  take the normalised NCHW batch and answer logits (:mod:`._onnx_import`) and stored as the
  bundle's ``model.onnx``; the bundle runs on the ONNX backend;
- a **state_dict or checkpoint** (``.pth``/``.pt``/``.bin``/``.safetensors``) of a named
  architecture: ``torchvision:<name>``, ``timm:<name>`` or a registered name (``resnet50`` is
  timm's, whose keys equal torchvision's). Every key and shape must fit, the classifier too;
  pickles that would run code are refused. The bundle runs on torch and exports to ONNX.

The preprocessing is declared by name (``keras-caffe``, ``keras-tf``, ``torch-imagenet``;
:data:`~imgtriage.data.preprocess.PREPROCESS_PRESETS`) or ``custom`` with mean/std, channel
order and value range, and stored in the manifest as data (``preprocess``), like a trained
bundle's. Given sample images and the original model's outputs for them, the import runs the
bundle on the images and refuses it (nothing is left at ``out``) when any probability differs
by more than the tolerance: the check that the declared preprocessing is the model's.

From then on it is an ordinary bundle: calibrate, evaluate, serve, cascade.

Example:
    >>> cfg = ImportConfig(classes=("cat", "dog"), preprocess="keras-caffe")
    >>> res = import_model("resnet50.onnx", "runs/imported/bundle", cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Manifest, new_manifest, save_bundle, sha256_file
from imgtriage.data.preprocess import PREPROCESS_PRESETS, PreprocessSpec
from imgtriage.errors import ConfigError, DataError, ImportParityError, WeightsMismatchError
from imgtriage.predict._onnx_import import (
    LAYOUTS,
    OUTPUT_KINDS,
    check_wrapped,
    inspect_graph,
    wrap_graph,
)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
ONNX_MODEL = "onnx"  # manifest model name of an imported graph (no torch architecture)


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


def classes_from_text(text: str) -> tuple[str, ...]:
    """Class names given as text: comma-separated, or the path of a file with one per line.

    Example:
        >>> classes_from_text("cat, dog")
        ('cat', 'dog')
    """
    if Path(text).is_file():
        return tuple(line.strip() for line in Path(text).read_text().splitlines()
                     if line.strip())
    return tuple(v.strip() for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class ImportConfig:
    """How to read a foreign model. Errors name the CLI flag that sets the value."""

    classes: tuple[str, ...] = _f((), "Class names in the model's output order: comma-"
                                      "separated, or a text file with one name per line.",
                                  parse=classes_from_text)
    preprocess: str = _f("torch-imagenet", "keras-caffe (RGB->BGR, ImageNet mean subtracted "
                                           "on 0..255), keras-tf (x/127.5-1), torch-imagenet, "
                                           "or custom (give --mean/--std).")
    arch: str | None = _f(None, "Architecture of a state_dict: torchvision:<name>, "
                                "timm:<name> or a registered name (not for .onnx).")
    size: int | None = _f(None, "Input side in pixels (default: the graph's, else 224).")
    in_chans: int = _f(3, "Input channels of a state_dict model.")
    mean: tuple[float, ...] | None = _f(None, "Per-channel mean, in the model's channel order "
                                              "and --value-range units (overrides the preset).")
    std: tuple[float, ...] | None = _f(None, "Per-channel std (overrides the preset).")
    channel_order: str | None = _f(None, "rgb or bgr (overrides the preset).")
    value_range: float | None = _f(None, "Multiply 0..1 pixels by this before mean/std (255: "
                                         "trained on 0..255; overrides the preset).")
    resize: str = _f("squash", "squash, shorter_crop (centre crop by --crop-pct) or pad.")
    crop_pct: float = _f(0.875, "Share of the shorter side kept by --resize shorter_crop.")
    interpolation: str = _f("bilinear", "nearest, bilinear, bicubic or area (Keras "
                                        "load_img's default is nearest).")
    layout: str = _f("auto", "ONNX input layout: auto, nchw or nhwc (Keras exports nhwc).")
    outputs: str = _f("auto", "ONNX outputs: auto (a final Softmax means probabilities), "
                              "logits or probabilities.")
    check_images: str | None = _f(None, "Sample images (a folder or one file) for the parity "
                                        "check.")
    expected: str | None = _f(None, "The original model's outputs on --check-images: .npy "
                                    "(N, classes) in sorted file order, or JSON {file name: "
                                    "[...]}; probabilities, or logits (softmaxed).")
    tolerance: float = _f(1e-4, "Largest |Δprobability| the parity check accepts.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError("give at least two distinct class names, in the model's output "
                              "order (--classes)")
        if self.preprocess != "custom" and self.preprocess not in PREPROCESS_PRESETS:
            raise ConfigError(f"unknown preprocessing {self.preprocess!r}; use one of "
                              f"{', '.join(PREPROCESS_PRESETS)} or custom (--preprocess)")
        if self.preprocess == "custom" and (self.mean is None or self.std is None):
            raise ConfigError("--preprocess custom needs --mean and --std (and --channel-order"
                              " / --value-range when not rgb / 1)")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)} (--layout)")
        if self.outputs not in OUTPUT_KINDS:
            raise ConfigError(f"outputs must be one of {', '.join(OUTPUT_KINDS)} (--outputs)")
        if (self.check_images is None) != (self.expected is None):
            raise ConfigError("the parity check needs both --check-images and --expected")
        if not 0 < self.tolerance < 1:
            raise ConfigError("tolerance must be in (0, 1) (--tolerance)")
        if self.size is not None and self.size < 8:
            raise ConfigError("size must be >= 8 pixels (--size)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImportOutput:
    """Where ``import_model`` writes the bundle (``imgtriage import --out``)."""

    out: Path = field(metadata={"help": "Bundle directory to write (or .zip).", "short": "-o"})


@dataclass(frozen=True)
class ImportResult:
    """What was imported and how it checked."""

    bundle_path: Path
    source_format: str  # "onnx" or "state_dict"
    preprocess: dict[str, Any]
    graph_parity: float | None  # wrapped vs original graph (ONNX imports)
    parity: dict[str, Any] | None  # against --expected, when given


def spec_for(cfg: ImportConfig, size: tuple[int, int], in_chans: int) -> PreprocessSpec:
    """The bundle's PreprocessSpec: the preset (or custom) plus the explicit overrides."""
    over = {"mean": cfg.mean, "std": cfg.std, "channel_order": cfg.channel_order,
            "value_range": cfg.value_range, "resize": cfg.resize, "crop_pct": cfg.crop_pct,
            "interpolation": cfg.interpolation}
    if cfg.preprocess == "custom":
        return PreprocessSpec(in_chans=in_chans, size=size,
                              **{k: v for k, v in over.items() if v is not None})
    return PreprocessSpec.from_preset(cfg.preprocess, size=size, in_chans=in_chans, **over)


def import_model(source: str | os.PathLike[str], out: str | os.PathLike[str],
                 cfg: ImportConfig) -> ImportResult:
    """Wrap ``source`` into a bundle at ``out`` (see the module docstring).

    Example:
        >>> cfg = ImportConfig(classes=("a", "b", "c"), arch="torchvision:resnet18")
        >>> import_model("best_resnet.pth", "runs/r18/bundle", cfg)  # doctest: +SKIP
    """
    src = Path(source)
    if not src.is_file():
        raise DataError(f"model file {src} does not exist")
    suffix = src.suffix.lower()
    if suffix == ".onnx":
        manifest, weights, files, graph_parity = _from_onnx(src, cfg)
    elif suffix in TORCH_SUFFIXES:
        manifest, weights, files, graph_parity = _from_state_dict(src, cfg)
    else:
        raise ConfigError(f"{src}: import takes an .onnx file or a state_dict/checkpoint "
                          f"({', '.join(TORCH_SUFFIXES)}); a Keras .keras/.h5 model converts to "
                          "ONNX with tf2onnx first (docs/import.md)")
    imported = {"source": src.name, "sha256": sha256_file(src),
                "format": "onnx" if suffix == ".onnx" else "state_dict",
                "config": cfg.to_dict(), "graph_parity": graph_parity, "parity": None}
    out = Path(out)
    save_bundle(out, manifest.with_changes(imported=imported), weights, files)
    parity = None
    if cfg.check_images is not None:
        try:
            parity = check_parity(out, cfg.check_images, cfg.expected, cfg.tolerance)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        save_bundle(out, manifest.with_changes(imported={**imported, "parity": parity}),
                    weights, files)
    return ImportResult(out, imported["format"], dict(manifest.preprocess), graph_parity,
                        parity)


def _manifest(model_name: str, kwargs: dict[str, Any], spec: PreprocessSpec,
              cfg: ImportConfig) -> Manifest:
    from imgtriage.evaluate.decision import DecisionPolicy

    return new_manifest(model_name=model_name, model_kwargs=kwargs, in_chans=spec.in_chans,
                        preprocess=spec.to_dict(), classes=list(cfg.classes),
                        decision=DecisionPolicy().to_dict())


def _from_onnx(src: Path, cfg: ImportConfig
               ) -> tuple[Manifest, None, dict[str, bytes], float]:
    from imgtriage.bundle.graph import ONNX_FILE
    from imgtriage.bundle.store import sha256_bytes

    if cfg.arch is not None:
        raise ConfigError("an ONNX file carries its own architecture; drop --arch")
    graph = src.read_bytes()
    info = inspect_graph(graph, cfg.layout, cfg.outputs)
    size = (cfg.size, cfg.size) if cfg.size else info.size
    if size is None:
        raise ConfigError("the graph leaves the input size open; give it with --size")
    if info.size is not None and tuple(size) != info.size:
        raise ConfigError(f"the graph takes {info.size[0]}x{info.size[1]} images, not "
                          f"{size[0]}x{size[1]}; drop --size or match it")
    spec = spec_for(cfg, tuple(size), info.in_chans)
    wrapped = wrap_graph(graph, info)
    graph_parity = check_wrapped(graph, wrapped, info, len(cfg.classes),
                                 (info.in_chans, *size))
    onnx = {"file": ONNX_FILE, "sha256": sha256_bytes(wrapped), "opset": info.opset,
            "input": "input", "output": "logits", "outputs": ["logits"], "dynamic_batch": True,
            "input_is": "normalised output of imgtriage.data.preprocess.to_input",
            "exporter": "imgtriage import (wrapped foreign graph)",
            "parity_max_abs_dprob": graph_parity, "precision": "fp32", "int8": None,
            "foreign": info.to_dict()}
    manifest = _manifest(ONNX_MODEL, {}, spec, cfg).with_changes(onnx=onnx)
    return manifest, None, {ONNX_FILE: wrapped}, graph_parity


def _from_state_dict(src: Path, cfg: ImportConfig
                     ) -> tuple[Manifest, dict[str, Any], dict[str, bytes], float | None]:
    if cfg.arch is None:
        raise ConfigError("a state_dict has no architecture in it; name it with --arch "
                          "(torchvision:resnet50, timm:<name> or a registered name)")
    if cfg.layout != "auto" or cfg.outputs not in ("auto", "logits"):
        raise ConfigError("--layout and --outputs are for ONNX files; a torch model takes NCHW "
                          "and answers logits")
    from imgtriage.predict.graph import training_graph

    side = cfg.size or 224
    spec = spec_for(cfg, (side, side), cfg.in_chans)
    manifest = _manifest(cfg.arch, {}, spec, cfg)
    model = _checked_model(src, cfg)
    # like a trained bundle: a verified ONNX graph (or the reason there is none)
    files, onnx = training_graph(model, manifest, _check_inputs(cfg, spec))
    return (manifest.with_changes(onnx=onnx), model.state_dict(), files,
            onnx.get("parity_max_abs_dprob"))


def _check_inputs(cfg: ImportConfig, spec: PreprocessSpec) -> np.ndarray | None:
    """The parity images through the bundle's preprocessing (None: random inputs)."""
    if cfg.check_images is None:
        return None
    from imgtriage.data.preprocess import load_input

    return np.stack([load_input(f, spec)[0] for f in _check_files(cfg.check_images)[:16]])


def _checked_model(src: Path, cfg: ImportConfig) -> Any:
    """``cfg.arch`` holding the file's weights (every key and shape must fit), eval mode."""
    from imgtriage.models import create_model
    from imgtriage.models.weights_file import read_state_dict

    state = read_state_dict(src)
    model = create_model(cfg.arch, len(cfg.classes), cfg.in_chans)
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not k.endswith("num_batches_tracked")}
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    k = len(cfg.classes)
    if shapes and all(own[n].shape[:1] == (k,) and state[n].ndim == own[n].ndim
                      for n in shapes):
        raise ConfigError(f"the weights' classifier ({shapes[0]}) has "
                          f"{state[shapes[0]].shape[0]} outputs but {k} class names were "
                          "given; pass one name per output, in output order (--classes)")
    missing = [n for n in own if n not in state and not n.endswith("num_batches_tracked")]
    unexpected = [n for n in state if n not in own]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what}: {', '.join(v[:5])}" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if v]
        raise WeightsMismatchError(f"{src} does not fit {cfg.arch}: {'; '.join(parts)}. Name "
                                   "the architecture the weights were saved from (--arch)")
    model.load_state_dict(state, strict=False)
    return model.eval()


# -- the parity check ------------------------------------------------------------------------
def _check_files(images: str | os.PathLike[str]) -> list[Path]:
    from imgtriage.data.discovery import iter_image_files
    from imgtriage.io import is_supported_path

    files = [p for p in iter_image_files(images) if is_supported_path(p)]
    if not files:
        raise DataError(f"no images under {images} for the parity check (--check-images)")
    return files


def _expected(path: str | os.PathLike[str], files: list[Path], root: Path,
              k: int) -> np.ndarray:
    """(N, K) rows of the original outputs, aligned with ``files``."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif p.suffix == ".json":
        doc = json.loads(p.read_text())
        if isinstance(doc, dict):
            rows = []
            for f in files:
                key = next((c for c in (f.name, str(f.relative_to(root)) if root.is_dir()
                                        else f.name, str(f)) if c in doc), None)
                if key is None:
                    raise DataError(f"{p} has no outputs for {f.name} (--expected)")
                rows.append(doc[key])
            arr = np.asarray(rows, dtype=np.float64)
        else:
            arr = np.asarray(doc, dtype=np.float64)
    else:
        raise ConfigError(f"expected outputs must be .npy or .json, got {p.name} (--expected)")
    if arr.shape != (len(files), k):
        raise DataError(f"{p} holds shape {list(arr.shape)} but the check has {len(files)} "
                        f"images and {k} classes: one row per image, sorted by path "
                        "(--expected)")
    return arr.astype(np.float64)


def _as_probs(rows: np.ndarray) -> np.ndarray:
    from imgtriage.evaluate.decision import softmax

    probs = rows.min() >= 0 and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3)
    return rows if probs else softmax(rows)


def check_parity(bundle: str | os.PathLike[str], images: str | os.PathLike[str],
                 expected: str | os.PathLike[str] | None, tolerance: float = 1e-4
                 ) -> dict[str, Any]:
    """Run the bundle on ``images`` and compare with ``expected`` (the original model's
    outputs); ImportParityError names the worst file when |Δp| exceeds ``tolerance``."""
    from imgtriage.data.preprocess import load_input
    from imgtriage.evaluate.decision import softmax
    from imgtriage.predict.predictor import Predictor

    pred = Predictor.load(bundle, num_threads=1)
    files = _check_files(images)
    want = _as_probs(_expected(expected, files, Path(images), len(pred.classes)))
    x = np.stack([load_input(f, pred.spec)[0] for f in files])
    got = softmax(pred.logits(x))
    diff = np.abs(got - want).max(axis=1)
    worst = int(diff.argmax())
    report = {"n_images": len(files), "max_abs_dprob": float(diff.max()),
              "top1_agreement": float(np.mean(got.argmax(1) == want.argmax(1))),
              "tolerance": tolerance}
    if not diff.max() <= tolerance:
        raise ImportParityError(
            f"the imported model differs from the expected outputs by {diff.max():.2e} "
            f"(> {tolerance}) on {files[worst].name} (top-1 agreement "
            f"{report['top1_agreement']:.0%} over {len(files)} images): the declared "
            "preprocessing is not the model's; check --preprocess, --size, --resize, "
            "--interpolation, --channel-order and the class order")
    return report
