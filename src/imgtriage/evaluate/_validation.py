"""Input checks shared by the evaluate modules: arrays in, clear errors out (never ``assert``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError, DataError


def as_scores(x: Any, name: str = "probs") -> np.ndarray:
    """A finite (N, K) float64 array, or a DataError saying what is wrong."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise DataError(f"{name} must be a 2-D array (n_samples, n_classes); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr).all(axis=1)))
        raise DataError(f"{name} has NaN or infinite values in {bad} rows; drop or fix those rows")
    return arr


def as_probs(x: Any, name: str = "probs") -> np.ndarray:
    """Like :func:`as_scores`, and also checks the rows are probability vectors."""
    arr = as_scores(x, name)
    if arr.size and (arr.min() < -1e-9 or arr.max() > 1 + 1e-9):
        raise DataError(f"{name} must lie in [0, 1]; pass logits with from_logits=True instead")
    if arr.size and np.max(np.abs(arr.sum(axis=1) - 1.0)) > 1e-4:
        raise DataError(f"rows of {name} must sum to 1; pass logits with from_logits=True instead")
    return arr


def as_labels(labels: Any, n_samples: int, n_classes: int) -> np.ndarray:
    """Integer labels in ``[0, n_classes)`` aligned with the score rows."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n_samples:
        raise DataError(f"labels must be 1-D with {n_samples} entries (one per row); "
                        f"got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer) and (
            not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr))):
        raise DataError(f"labels must be integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise DataError(f"labels must lie in [0, {n_classes}); found {arr.min()}..{arr.max()}")
    return arr


def check_class_names(class_names: Sequence[str], n_classes: int) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise DataError(f"{len(names)} class names for {n_classes} score columns; "
                        "give one name per column, in output order")
    return names


def check_alpha(alpha: float, flag: str = "--alpha") -> float:
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ConfigError(f"alpha must lie strictly between 0 and 1, got {alpha} ({flag})")
    return a


def check_choice(value: str, choices: Sequence[str], what: str, flag: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {list(choices)} ({flag})")
    return value


def not_fitted(obj: object) -> ConfigError:
    name = type(obj).__name__
    return ConfigError(f"this {name} is not fitted yet; call fit(...) before using it")


def json_safe(x: Any) -> Any:
    """Recursively turn numpy values into plain Python and non-finite floats into None."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        f = float(x)
        return f if math.isfinite(f) else None
    return x
