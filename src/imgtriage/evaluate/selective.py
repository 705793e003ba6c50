"""Selective classification: one confidence threshold that answers as many images as possible
while the answered ones keep a target accuracy (the rest are abstained on, "unknown").

This is the default rule ``imgtriage train`` writes into every bundle: a single threshold on
the calibrated top-class probability, the same for every class, chosen on validation images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._validation import as_labels, as_probs, json_safe


def fit_confidence_threshold(probs: Any, labels: Any, target_accuracy: float
                             ) -> dict[str, Any]:
    """The lowest confidence threshold whose answered images reach ``target_accuracy``.

    Answering means ``max_k p_k >= threshold``. Among all thresholds (each distinct
    validation confidence) whose answered accuracy reaches the target, the one answering the
    most images wins. When none does (even the most confident image is wrong) the threshold
    is 1.0 and ``met`` is False. Returns threshold, coverage, accuracy (of answered), n, met.

    Example:
        >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
        >>> r = fit_confidence_threshold(p, [0, 0, 1, 0], 0.9)
        >>> r["threshold"], r["coverage"], r["accuracy"]
        (0.8, 0.5, 1.0)
    """
    if not 0.0 < float(target_accuracy) <= 1.0:
        raise ConfigError(f"target accuracy must be in (0, 1], got {target_accuracy} "
                          "(--target-accuracy)")
    p = as_probs(probs)
    y = as_labels(labels, len(p), p.shape[1])
    n = len(y)
    if n == 0:
        raise ConfigError("cannot choose a confidence threshold on zero validation images")
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order = np.argsort(-conf, kind="stable")
    c, ok = conf[order], correct[order]
    # accepting conf >= t takes whole groups of equal confidence: look at each group's end
    last = np.r_[np.flatnonzero(np.diff(c) != 0), n - 1]
    answered = last + 1
    acc = np.cumsum(ok)[last] / answered
    feasible = np.flatnonzero(acc >= float(target_accuracy) - 1e-12)
    if len(feasible) == 0:
        return json_safe({"threshold": 1.0, "coverage": float(np.mean(conf >= 1.0)),
                          "accuracy": None, "n": n, "target": float(target_accuracy),
                          "met": False, "note": "no threshold reaches the target accuracy on "
                          "validation; everything below confidence 1.0 is abstained on"})
    i = int(feasible[-1])
    return json_safe({"threshold": float(c[last[i]]), "coverage": float(answered[i] / n),
                      "accuracy": float(acc[i]), "n": n, "target": float(target_accuracy),
                      "met": True, "note": None})
