"""The one exception tree of imgtriage.

Every error a user can cause derives from :class:`ImgTriageError`, and its message says what
was expected and how to fix the input::

    ImgTriageError
     ├── ConfigError            a setting is out of range (names the CLI flag to change)
     ├── DataError              a dataset folder or manifest cannot be used
     │    └── ImageReadError     one file could not be read (carries a Defect)
     ├── ModelError             unknown architecture, bad arguments
     │    ├── WeightsUnavailableError   pretrained weights cannot be had (offline, missing file)
     │    ├── WeightsMismatchError      a weights file does not fit the architecture (keys/shapes)
     │    └── UnsafeWeightsError        a weights file is a pickle that would run code
     ├── BundleError            a bundle cannot be saved or loaded
     │    ├── BundleSchemaError  unknown or malformed manifest
     │    ├── BundleIntegrityError  a file's sha256 differs from the manifest
     │    ├── BundleMissingFileError  a file the manifest names is absent
     │    └── ImportParityError  an imported model does not reproduce the expected outputs
     ├── PredictionError        inputs to a Predictor are unusable as a whole
     ├── ServiceStartError      `imgtriage serve` exited or never became ready (log attached)
     └── MissingDependencyError an optional extra is not installed

Single bad files inside a batch never raise: they become ``Defect`` records (see ``imgtriage.io``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgtriage.io import Defect

__all__ = [
    "BundleError",
    "BundleIntegrityError",
    "BundleMissingFileError",
    "BundleSchemaError",
    "ConfigError",
    "DataError",
    "ImageReadError",
    "ImgTriageError",
    "ImportParityError",
    "MissingDependencyError",
    "ModelError",
    "PredictionError",
    "ServiceStartError",
    "UnsafeWeightsError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "require",
]


class ImgTriageError(Exception):
    """Base class of every error imgtriage raises on purpose."""


class ConfigError(ImgTriageError, ValueError):
    """A configuration value is invalid; the message names the flag to change."""


class DataError(ImgTriageError):
    """A dataset folder, manifest or split cannot be used as given."""


class ImageReadError(DataError):
    """One file could not be turned into an image; ``defect`` says why."""

    def __init__(self, defect: Defect) -> None:
        super().__init__(f"{defect.path}: {defect.issue}: {defect.message}")
        self.defect = defect


class ModelError(ImgTriageError):
    """An architecture name or its arguments are not usable."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights were asked for but cannot be obtained here."""


class WeightsMismatchError(ModelError):
    """A pretrained weights file does not fit the architecture: missing, unexpected or
    differently shaped keys outside the classifier head. Never a silent random init."""


class UnsafeWeightsError(ModelError):
    """A weights file is a pickle that needs code to load; only plain tensors are accepted."""


class BundleError(ImgTriageError):
    """A bundle cannot be written or read."""


class BundleSchemaError(BundleError):
    """The manifest is malformed or has a schema version this release cannot read."""


class BundleIntegrityError(BundleError):
    """A file in the bundle does not match the sha256 recorded in its manifest."""


class BundleMissingFileError(BundleError):
    """A file the manifest lists is missing from the bundle."""


class ImportParityError(BundleError):
    """A model wrapped by ``imgtriage import`` answers the sample images differently from the
    outputs given for them: its declared preprocessing (or class order) is not the model's."""


class PredictionError(ImgTriageError):
    """A prediction request is unusable as a whole (not one bad file in a batch)."""


class ServiceStartError(ImgTriageError):
    """A service started as a child process exited or did not become ready in time."""


class MissingDependencyError(ImgTriageError, ImportError):
    """An optional dependency is missing; the message gives the pip line to run."""


def require(module: str, extra: str):
    """Import an optional dependency lazily, or fail with the install line to run.

    Example:
        >>> ort = require("onnxruntime", "onnx")  # doctest: +SKIP
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this feature needs the optional package '{module}': "
            f"run `pip install 'imgtriage[{extra}]'`"
        ) from exc
