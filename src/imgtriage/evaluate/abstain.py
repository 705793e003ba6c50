"""What abstaining costs and buys: coverage, accuracy on what is kept, who gets abstained on.

The rule is the one :class:`~imgtriage.evaluate.decision.DecisionPolicy` applies: the top class
``k`` is kept when ``p_k >= thresholds[k]``, otherwise the input is abstained on. With a
``positive_class`` (the recall-first rule) an input whose positive probability reaches that
class's threshold is answered positive and never abstained on, as the policy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._validation import as_labels, as_probs, check_class_names, json_safe


def _threshold_array(thresholds: Any, n_classes: int) -> np.ndarray:
    if thresholds is None:
        return np.zeros(n_classes)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n_classes, float(t))
    if t.shape != (n_classes,):
        raise ConfigError(f"{t.size} thresholds for {n_classes} classes; give one per class "
                          "(--thresholds)")
    if np.any(~np.isfinite(t)) or t.min() < 0 or t.max() > 1:
        raise ConfigError("thresholds must lie in [0, 1] (--thresholds)")
    return t


def _answers(p: np.ndarray, t: np.ndarray, positive_class: int | None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(answered class, abstained) under the thresholds, as ``DecisionPolicy.decide`` rules."""
    top = p.argmax(axis=1)
    positive = np.zeros(len(p), dtype=bool)
    if positive_class is not None:
        if not 0 <= int(positive_class) < p.shape[1]:
            raise ConfigError(f"positive class index {positive_class} is out of range "
                              "(--positive-class)")
        positive = p[:, positive_class] >= t[positive_class]
        top = np.where(positive, int(positive_class), top)
    return top, (p[np.arange(len(p)), top] < t[top]) & ~positive


def abstain_mask(probs: Any, thresholds: Any, positive_class: int | None = None) -> np.ndarray:
    """True where the answered class scores below its threshold (the input is abstained on).

    Example:
        >>> abstain_mask([[0.6, 0.4], [0.2, 0.8]], [0.7, 0.7]).tolist()
        [True, False]
        >>> abstain_mask([[0.6, 0.4], [0.2, 0.8]], [0.7, 0.3], positive_class=1).tolist()
        [False, False]
    """
    p = as_probs(probs)
    return _answers(p, _threshold_array(thresholds, p.shape[1]), positive_class)[1]


def _rate(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(a) / float(b) if b else None for a, b in zip(num, den, strict=True)]


def abstain_summary(probs: Any, labels: Any, thresholds: Any,
                    class_names: Sequence[str] | None = None,
                    positive_class: int | None = None) -> dict[str, Any]:
    """Coverage, accuracy at coverage and per-class abstain rates under per-class thresholds.

    ``thresholds`` is one float per class, a single float for all, or None (never abstain).
    Per class, ``abstain_rate`` is over samples whose *true* class it is and
    ``predicted_abstain_rate`` over samples whose *top* class it is. ``accuracy_at_coverage``
    is None when everything is abstained on. ``positive_class`` applies the recall-first rule
    (see the module docstring), so the figures match what a policy with it answers.

    Example:
        >>> s = abstain_summary([[0.6, 0.4], [0.2, 0.8], [0.9, 0.1]], [1, 1, 0], [0.7, 0.7])
        >>> s["coverage"], s["accuracy_at_coverage"], s["abstain_count"]
        (0.6666666666666666, 1.0, 1)
    """
    p = as_probs(probs)
    n, n_classes = p.shape
    y = as_labels(labels, n, n_classes)
    names = check_class_names(class_names, n_classes) if class_names is not None else None
    t = _threshold_array(thresholds, n_classes)
    top, abstained = _answers(p, t, positive_class)
    kept = ~abstained
    correct = top == y
    n_kept = int(kept.sum())
    per_true_n = np.bincount(y, minlength=n_classes)
    per_true_abs = np.bincount(y[abstained], minlength=n_classes)
    per_pred_n = np.bincount(top, minlength=n_classes)
    per_pred_abs = np.bincount(top[abstained], minlength=n_classes)
    per_class = [
        {"class": names[k] if names else k, "threshold": t[k], "support": per_true_n[k],
         "abstain_count": per_true_abs[k], "abstain_rate": r_true, "predicted": per_pred_n[k],
         "predicted_abstain_count": per_pred_abs[k], "predicted_abstain_rate": r_pred}
        for k, r_true, r_pred in zip(range(n_classes), _rate(per_true_abs, per_true_n),
                                     _rate(per_pred_abs, per_pred_n), strict=True)
    ]
    summary = {
        "n_samples": n,
        "thresholds": t,
        "coverage": n_kept / n if n else None,
        "abstain_count": n - n_kept,
        "abstain_rate": (n - n_kept) / n if n else None,
        "accuracy": float(correct.mean()) if n else None,
        "accuracy_at_coverage": float(correct[kept].mean()) if n_kept else None,
        "risk_at_coverage": float(1 - correct[kept].mean()) if n_kept else None,
        "accuracy_of_abstained": float(correct[abstained].mean()) if n - n_kept else None,
        "per_class": per_class,
    }
    return json_safe(summary)
