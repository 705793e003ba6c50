"""One-vs-rest counting at every distinct threshold: the base of PR/ROC curves and thresholds.

The decision rule everywhere in imgtriage is ``score >= threshold`` (the same one
:class:`~imgtriage.evaluate.decision.DecisionPolicy` applies), so a threshold equal to a score
accepts that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BinaryCounts:
    """Counts when accepting ``score >= thresholds[i]``; thresholds strictly decreasing."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def precision(self) -> np.ndarray:
        pred = self.tp + self.fp
        return np.divide(self.tp, pred, out=np.zeros(len(pred)), where=pred > 0)

    @property
    def recall(self) -> np.ndarray:
        if self.n_pos == 0:
            return np.full(len(self.tp), np.nan)
        return self.tp / self.n_pos


def binary_counts(scores: np.ndarray, positives: np.ndarray) -> BinaryCounts:
    """TP/FP at each distinct score used as threshold (descending)."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positives[order]
    tp_cum = np.cumsum(pos)
    fp_cum = np.cumsum(~pos)
    # last index of each group of equal scores: accepting s >= t takes the whole group
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1] if len(s) else np.array([], int)
    return BinaryCounts(thresholds=s[last], tp=tp_cum[last].astype(np.int64),
                        fp=fp_cum[last].astype(np.int64), n_pos=int(pos.sum()),
                        n_neg=int((~pos).sum()))


def downsample_indices(n: int, max_points: int) -> np.ndarray:
    """At most ``max_points`` evenly spread indices into ``range(n)``, endpoints kept."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max(2, max_points))).astype(np.int64))
