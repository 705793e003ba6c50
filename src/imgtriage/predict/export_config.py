"""What ``imgtriage export`` / ``export_onnx`` can be told, as one frozen record.

Each field carries its ``--help`` text in ``metadata["help"]`` (``cli/_options.py`` builds the
command's options from them); errors name the CLI flag that sets the value. No heavy imports
here: the CLI imports this module at start-up.

Example:
    >>> cfg = ExportConfig(quantize="static", calib="runs/a/splits.csv")
    >>> cfg.calib_images, cfg.check_images, cfg.opset
    (64, 500, 17)
    >>> ExportConfig(quantize="int4", calib="x")
    Traceback (most recent call last):
    ...
    imgtriage.errors.ConfigError: quantize must be static or dynamic, got 'int4' (--quantize)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError
from imgtriage.predict.int8 import QUANT_MODES


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ExportConfig:
    """The export's settings: int8 mode, the images that calibrate and judge it, the opset,
    and where the new bundle version goes (``None``: in place)."""

    quantize: str | None = _f(None, "Also write an int8 graph: static (QDQ, per-channel, "
                                    "calibrated on --calib; ~2x faster for CNNs) or dynamic "
                                    "(slower for CNNs). It becomes the default only when the "
                                    "check on held-out images proves it (accuracy drop <= 0.5 "
                                    "points, agreement >= 99%).")
    calib: Path | None = field(default=None, metadata={"help": (
        "RUN/splits.csv (calibrate on its train rows, check on its val rows), another "
        "CSV/JSONL manifest, or a folder (class folders named like the bundle's classes give "
        "labels; a seeded part is held out for the check).")})
    check: Path | None = field(default=None, metadata={"help": (
        "Held-out labelled images (folder or manifest) to judge int8 on, instead of --calib's "
        "val rows.")})
    calib_images: int = _f(64, "How many training images calibrate int8.")
    check_images: int = _f(500, "How many held-out images judge int8.")
    opset: int = _f(17, "ONNX opset.")
    out: Path | None = field(default=None, metadata={"help": (
        "Write the new version here instead of in place (needed for a zipped bundle: a .zip "
        "path).")})

    def __post_init__(self) -> None:
        for name in ("calib", "check", "out"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.quantize is not None and self.quantize not in QUANT_MODES:
            raise ConfigError(f"quantize must be static or dynamic, got {self.quantize!r} "
                              "(--quantize)")
        if self.quantize and self.calib is None:
            raise ConfigError("int8 quantisation needs real images to calibrate on and "
                              "held-out labelled images to check it against fp32: pass --calib "
                              "RUN/splits.csv (train rows calibrate, val rows check) or "
                              "--calib DIR")
        if self.calib_images < 1:
            raise ConfigError("calib_images must be >= 1 (--calib-images)")
        if self.check_images < 1:
            raise ConfigError("check_images must be >= 1 (--check-images)")


@dataclass(frozen=True)
class ExportFormat:
    """Which formats ``imgtriage export`` writes (ONNX is the only one so far; none chosen is
    an error the command reports)."""

    onnx: bool = field(default=False, metadata={
        "help": "Write model.onnx (dynamic batch axis) into a new version of the bundle.",
        "switch": True})
