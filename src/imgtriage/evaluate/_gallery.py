"""Failure analysis: the most confident mistakes per class and the most confused pairs,
with thumbnails read through :mod:`imgtriage.io` (unreadable files get a reason, never a crash).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Reader = Callable[[str], Any]


def _item(i: int, p: np.ndarray, y: np.ndarray, pred: np.ndarray, paths: Sequence[str],
          names: Sequence[str]) -> dict[str, Any]:
    return {"index": int(i), "path": str(paths[i]), "true": names[y[i]],
            "predicted": names[pred[i]], "score": float(p[i, pred[i]]),
            "true_score": float(p[i, y[i]])}


def _most_confident(mask: np.ndarray, score: np.ndarray, limit: int) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return idx[np.argsort(-score[idx], kind="stable")[:limit]]


def failure_cases(probs: np.ndarray, labels: np.ndarray, names: Sequence[str],
                  paths: Sequence[str], per_class: int = 5, n_pairs: int = 10,
                  per_pair: int = 3, *, pred: np.ndarray | None = None,
                  exclude: np.ndarray | None = None) -> dict[str, Any]:
    """Highest-confidence false negatives/positives per class, and the most confused pairs.

    A false negative of class ``c`` is a ``c`` sample predicted as another class, a false
    positive one predicted ``c`` that is not; both are ranked by the predicted class's score.
    ``pred`` replaces the top class by a decision rule's answers (e.g. a recall-first
    threshold); samples where ``exclude`` is True (abstained on) are never failures.
    """
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, dtype=np.int64)
    score = probs[np.arange(len(pred)), pred]
    wrong = pred != labels
    if exclude is not None:
        wrong &= ~np.asarray(exclude, dtype=bool)
    classes = []
    for k, name in enumerate(names):
        fn = _most_confident(wrong & (labels == k), score, per_class)
        fp = _most_confident(wrong & (pred == k), score, per_class)
        classes.append({"class": name,
                        "false_negatives": [_item(i, probs, labels, pred, paths, names)
                                            for i in fn],
                        "false_positives": [_item(i, probs, labels, pred, paths, names)
                                            for i in fp]})
    n = len(names)
    cm = np.bincount(labels[wrong] * n + pred[wrong], minlength=n * n).reshape(n, n)
    flat = np.argsort(-cm, axis=None, kind="stable")[:n_pairs]
    pairs = []
    for f in flat:
        t, q = divmod(int(f), n)
        if cm[t, q] == 0:
            break
        ex = _most_confident(wrong & (labels == t) & (pred == q), score, per_pair)
        pairs.append({"true": names[t], "predicted": names[q], "count": int(cm[t, q]),
                      "examples": [_item(i, probs, labels, pred, paths, names) for i in ex]})
    return {"per_class": classes, "confused_pairs": pairs}


def to_uint8(array: Any) -> np.ndarray:
    """Any-dtype (H, W) or (H, W, C) image to uint8 by min/max over finite values, <= 3 channels.

    Example:
        >>> to_uint8(np.array([[0, 500], [1000, 1000]], dtype=np.uint16)).tolist()
        [[0, 128], [255, 255]]
    """
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[..., :3] if a.shape[2] >= 3 else a[..., 0]
    if a.ndim != 2 and not (a.ndim == 3 and a.shape[2] == 3):
        raise ValueError(f"cannot show an array of shape {np.shape(array)}")
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def default_reader() -> Reader | str:
    """``imgtriage.io.read_image``, or the reason it cannot be used."""
    try:
        from imgtriage.io import read_image
    except ImportError as exc:
        return f"image reader unavailable: {exc}"
    return read_image


def thumbnail(path: str, reader: Reader | str, size: int = 96) -> tuple[str | None, str | None]:
    """``(data_uri, None)`` for a readable image, ``(None, reason)`` otherwise."""
    if isinstance(reader, str):
        return None, reader
    from PIL import Image

    from imgtriage.errors import ImageReadError

    try:
        record = reader(path)
        array = record.array if hasattr(record, "array") else record
        img = Image.fromarray(to_uint8(array))
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except ImageReadError as exc:
        return None, f"{exc.defect.issue}: {exc.defect.message}"
    except Exception as exc:  # a thumbnail must never sink the report
        return None, f"{type(exc).__name__}: {exc}"
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def attach_thumbnails(failures: dict[str, Any], reader: Reader | str, size: int = 96,
                      max_thumbnails: int = 1000,
                      known: dict[int, tuple[str | None, str | None]] | None = None
                      ) -> dict[int, tuple[str | None, str | None]]:
    """Thumbnails for every gallery item, keyed by sample index (each file read once; indices
    in ``known`` are not read again)."""
    items = [it for c in failures["per_class"]
             for it in c["false_negatives"] + c["false_positives"]]
    items += [it for pair in failures["confused_pairs"] for it in pair["examples"]]
    known = known or {}
    thumbs: dict[int, tuple[str | None, str | None]] = {}
    for it in items:
        if it["index"] in thumbs or it["index"] in known:
            continue
        if len(thumbs) >= max_thumbnails:
            thumbs[it["index"]] = (None, f"thumbnail limit ({max_thumbnails}) reached")
        else:
            thumbs[it["index"]] = thumbnail(it["path"], reader, size)
    return thumbs
