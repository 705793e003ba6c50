"""imgtriage: from a folder of labelled images to a calibrated classifier that knows when to
say "unknown", run as a Python call, a command over millions of files, an HTTP service or on
a cluster.

Example:
    >>> import imgtriage
    >>> res = imgtriage.train("data/", "runs/a", imgtriage.TrainConfig(epochs=5))  # doctest: +SKIP
    >>> p = imgtriage.Predictor.load(res.bundle_path)  # doctest: +SKIP
    >>> p.predict_paths(["inbox/"])["results"][:1]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from imgtriage._version import __version__

# Public name -> module that defines it. Imported on first use so that `import imgtriage`
# stays cheap and the io layer never pulls in torch.
_EXPORTS = {
    "Predictor": "imgtriage.predict",
    "PredictOptions": "imgtriage.predict",
    "write_report": "imgtriage.predict",
    "train": "imgtriage.train.run",
    "TrainConfig": "imgtriage.train.config",
    "TrainResult": "imgtriage.train.run",
    "fit": "imgtriage.train.loop",
    "load_bundle": "imgtriage.bundle",
    "save_bundle": "imgtriage.bundle",
    "Bundle": "imgtriage.bundle",
    "create_model": "imgtriage.models",
    "list_models": "imgtriage.models",
    "register_model": "imgtriage.models",
    "discover": "imgtriage.data",
    "split_dataset": "imgtriage.data",
    "PreprocessSpec": "imgtriage.data",
    "load_input": "imgtriage.data",
    "read_image": "imgtriage.io",
    "try_read_image": "imgtriage.io",
    "Defect": "imgtriage.io",
    "ReadPolicy": "imgtriage.io",
    "DecisionPolicy": "imgtriage.evaluate.decision",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imgtriage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
