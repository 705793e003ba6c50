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
import os
from typing import TYPE_CHECKING, Any

# The subpackage ``imgtriage.train`` and the function ``imgtriage.train`` share a name. Importing
# a submodule binds it on its parent, so the package is imported here first (a namespace
# package: nothing heavy runs) and the name is then rebound to the function below, for good.
import imgtriage.train as _train_pkg  # noqa: F401  (bind the subpackage before the function)
from imgtriage._version import __version__

if TYPE_CHECKING:
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import TrainResult

# Public name -> module that defines it. Imported on first use so that `import imgtriage`
# stays cheap and the io layer never pulls in torch.
_EXPORTS = {
    "Predictor": "imgtriage.predict",
    "PredictOptions": "imgtriage.predict",
    "write_report": "imgtriage.predict",
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
    "import_model": "imgtriage.predict.importing",
    "ImportConfig": "imgtriage.predict.importing",
}

__all__ = ["__version__", *sorted([*_EXPORTS, "train"])]


def train(data: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          cfg: TrainConfig | None = None, *, quiet: bool = False,
          resume: bool = False) -> TrainResult:
    """Train a classifier and save its bundle under ``out_dir/bundle``: see
    :func:`imgtriage.train.run.train` (imported on first call, so that ``import imgtriage``
    stays cheap). ``cfg`` None is ``TrainConfig()``.

    Example:
        >>> import imgtriage
        >>> cfg = imgtriage.TrainConfig(epochs=5)
        >>> res = imgtriage.train("data/", "runs/a", cfg)  # doctest: +SKIP
    """
    from imgtriage.train.config import TrainConfig as _Config
    from imgtriage.train.run import train as _train

    return _train(data, out_dir, cfg if cfg is not None else _Config(), quiet=quiet,
                  resume=resume)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imgtriage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
