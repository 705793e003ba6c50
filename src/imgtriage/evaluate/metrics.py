"""Classification, calibration and selective-prediction metrics on plain arrays.

Everything takes ``probs`` (N, K) and integer ``labels`` (N,) and returns plain floats, arrays
or dicts, so the same numbers back the JSON report, the HTML report and the tests.
:func:`classification_report` gathers all of them into one JSON-serialisable dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._curves import binary_counts, downsample_indices
from imgtriage.evaluate._validation import (
    as_labels,
    as_probs,
    as_scores,
    check_choice,
    check_class_names,
    json_safe,
)
from imgtriage.evaluate.decision import softmax

BinMode = Literal["equal_width", "adaptive"]


def to_probs(logits_or_probs: Any, from_logits: bool = True) -> np.ndarray:
    """Probabilities from logits (softmax) or checked probabilities as given.

    Example:
        >>> to_probs([[0.0, 0.0]]).tolist()
        [[0.5, 0.5]]
    """
    if from_logits:
        return softmax(as_scores(logits_or_probs, "logits"))
    return as_probs(logits_or_probs)


def _checked(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = as_probs(probs)
    return p, as_labels(labels, len(p), p.shape[1])


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of rows whose argmax equals the label.

    Example:
        >>> accuracy([[0.9, 0.1], [0.2, 0.8]], [0, 0])
        0.5
    """
    p, y = _checked(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y)) if len(y) else float("nan")


def top_k_accuracy(probs: Any, labels: Any, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (ties broken by index).

    Example:
        >>> top_k_accuracy([[0.5, 0.3, 0.2]], [1], k=2)
        1.0
    """
    p, y = _checked(probs, labels)
    if k < 1:
        raise ConfigError(f"top-k needs k >= 1, got {k} (--topk)")
    k = min(int(k), p.shape[1])
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == y[:, None]).any(axis=1))) if len(y) else float("nan")


def confusion_matrix(labels: Any, predictions: Any, n_classes: int) -> np.ndarray:
    """Counts ``cm[true, predicted]``.

    Example:
        >>> confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist()
        [[1, 0], [1, 1]]
    """
    y = as_labels(labels, len(np.asarray(labels)), n_classes)
    pred = as_labels(predictions, len(y), n_classes)
    return np.bincount(y * n_classes + pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def balanced_accuracy(probs: Any, labels: Any) -> float:
    """Mean recall over the classes present in ``labels`` (as scikit-learn defines it).

    Example:
        >>> balanced_accuracy([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]], [0, 0, 0])
        0.6666666666666666
    """
    p, y = _checked(probs, labels)
    cm = confusion_matrix(y, p.argmax(axis=1), p.shape[1])
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else np.nan


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix.

    Undefined ratios (a class never predicted or never present) are 0, as in scikit-learn's
    ``zero_division=0``.

    Example:
        >>> per_class_scores(np.array([[1, 1], [0, 2]]))["recall"].tolist()
        [0.5, 1.0]
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1,
            "support": support.astype(np.int64), "predicted": predicted.astype(np.int64)}


def _averages(scores: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    # like scikit-learn's default: average over classes seen in labels or predictions
    used = (scores["support"] > 0) | (scores["predicted"] > 0)
    weights = scores["support"].astype(np.float64)
    macro, weighted = {}, {}
    for key in ("precision", "recall", "f1"):
        vals = scores[key]
        macro[key] = float(vals[used].mean()) if used.any() else float("nan")
        weighted[key] = float(np.average(vals, weights=weights)) if weights.sum() else np.nan
    return macro, weighted


def negative_log_likelihood(probs: Any, labels: Any, eps: float = 1e-15) -> float:
    """Mean ``-log p[label]`` (probabilities clipped at ``eps`` so a confident miss is finite).

    Example:
        >>> round(negative_log_likelihood([[0.5, 0.5]], [0]), 4)
        0.6931
    """
    p, y = _checked(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))))


def brier_score(probs: Any, labels: Any) -> float:
    """Mean over rows of ``sum_k (p_k - onehot_k)^2`` (multi-class Brier, in [0, 2]).

    Example:
        >>> brier_score([[1.0, 0.0]], [1])
        2.0
    """
    p, y = _checked(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _bin_ids(conf: np.ndarray, n_bins: int, mode: str) -> np.ndarray:
    if mode == "equal_width":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to bin 0
        return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    ids = np.empty(len(conf), dtype=np.int64)
    for i, chunk in enumerate(np.array_split(np.argsort(conf, kind="stable"), n_bins)):
        ids[chunk] = i
    return ids


def _binned(conf: np.ndarray, hit: np.ndarray, n_bins: int, mode: str) -> dict[str, np.ndarray]:
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins} (--ece-bins)")
    check_choice(mode, ("equal_width", "adaptive"), "ECE binning mode", "--ece-mode")
    ids = _bin_ids(conf, n_bins, mode)
    count = np.bincount(ids, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(ids, weights=conf, minlength=n_bins) / count
        mean_hit = np.bincount(ids, weights=hit.astype(np.float64), minlength=n_bins) / count
    if mode == "equal_width":
        lower, upper = np.linspace(0, 1, n_bins + 1)[:-1], np.linspace(0, 1, n_bins + 1)[1:]
    else:
        lower = np.array([conf[ids == b].min() if count[b] else np.nan for b in range(n_bins)])
        upper = np.array([conf[ids == b].max() if count[b] else np.nan for b in range(n_bins)])
    return {"lower": lower, "upper": upper, "count": count.astype(np.int64),
            "confidence": mean_conf, "accuracy": mean_hit}


def _ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    count = bins["count"].astype(np.float64)
    used = count > 0
    gap = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    return float(np.sum(count[used] * gap) / count.sum()) if count.sum() else float("nan")


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15,
                     mode: BinMode = "equal_width") -> dict[str, np.ndarray]:
    """Per-bin mean top-class confidence, accuracy and count (the reliability diagram's data).

    ``equal_width`` bins are ``(i/n, (i+1)/n]``; ``adaptive`` bins hold (nearly) equal numbers
    of samples, sorted by confidence. Empty bins have NaN confidence and accuracy.

    Example:
        >>> reliability_bins([[0.9, 0.1]], [0], n_bins=2)["count"].tolist()
        [0, 1]
    """
    p, y = _checked(probs, labels)
    return _binned(p.max(axis=1), p.argmax(axis=1) == y, n_bins, mode)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15,
                               mode: BinMode = "equal_width") -> float:
    """ECE of the top-class confidence: ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``.

    Example:
        >>> round(expected_calibration_error([[0.8, 0.2], [0.6, 0.4]], [0, 1], n_bins=5), 4)
        0.4
    """
    return _ece_from_bins(reliability_bins(probs, labels, n_bins, mode))


def classwise_ece(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, Any]:
    """Class-wise ECE: equal-width ECE of ``p_k`` against ``label == k``, averaged over classes.

    Example:
        >>> classwise_ece([[0.8, 0.2], [0.6, 0.4]], [0, 1], n_bins=5)["mean"] > 0
        True
    """
    p, y = _checked(probs, labels)
    per_class = [_ece_from_bins(_binned(p[:, k], y == k, n_bins, "equal_width"))
                 for k in range(p.shape[1])]
    return {"mean": float(np.mean(per_class)), "per_class": per_class}


def precision_recall_curve(scores: Any, positives: Any, max_points: int = 200) -> dict[str, Any]:
    """One-vs-rest PR curve (downsampled) and average precision (None without positives).

    Average precision is ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds, as in
    scikit-learn's ``average_precision_score``.

    Example:
        >>> precision_recall_curve([0.9, 0.2, 0.6], [1, 0, 1])["average_precision"]
        1.0
    """
    c = binary_counts(np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool))
    if c.n_pos == 0:
        return {"precision": None, "recall": None, "thresholds": None, "average_precision": None}
    precision, recall = c.precision, c.recall
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    idx = downsample_indices(len(recall), max_points)
    return {"precision": precision[idx], "recall": recall[idx],
            "thresholds": c.thresholds[idx], "average_precision": ap}


def roc_curve(scores: Any, positives: Any, max_points: int = 200) -> dict[str, Any]:
    """One-vs-rest ROC curve (downsampled) and AUC; None when one side has no samples.

    Example:
        >>> roc_curve([0.9, 0.2, 0.6], [1, 0, 0])["auc"]
        1.0
    """
    c = binary_counts(np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool))
    if c.n_pos == 0 or c.n_neg == 0:
        return {"fpr": None, "tpr": None, "thresholds": None, "auc": None}
    fpr = np.r_[0.0, c.fp / c.n_neg]
    tpr = np.r_[0.0, c.tp / c.n_pos]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    idx = downsample_indices(len(fpr), max_points)
    return {"fpr": fpr[idx], "tpr": tpr[idx], "thresholds": np.r_[np.inf, c.thresholds][idx],
            "auc": auc}


def risk_coverage(probs: Any, labels: Any, confidence: Any = None,
                  max_points: int = 200) -> dict[str, Any]:
    """Risk (error rate) of the most confident fraction of samples, for every coverage, and AURC.

    Samples are accepted by decreasing ``confidence`` (default: top-class probability); tied
    confidences are accepted together, so the curve does not depend on row order. ``aurc`` is
    the mean risk over all coverages, ``eaurc`` its excess over a perfect ranking.

    Example:
        >>> risk_coverage([[0.9, 0.1], [0.6, 0.4]], [0, 1])["aurc"]
        0.25
    """
    p, y = _checked(probs, labels)
    n = len(y)
    if n == 0:
        return {"coverage": [], "risk": [], "aurc": None, "eaurc": None}
    conf = p.max(axis=1) if confidence is None else np.asarray(confidence, dtype=np.float64)
    errors = p.argmax(axis=1) != y
    c = binary_counts(conf, errors)  # "positives" are errors; groups of tied confidence
    accepted = c.tp + c.fp
    risk = c.tp / accepted
    group_sizes = np.diff(np.r_[0, accepted])
    aurc = float(np.sum(group_sizes * risk) / n)
    n_err = int(errors.sum())
    i = np.arange(1, n + 1)
    optimal = float(np.mean(np.maximum(0, i - (n - n_err)) / i))
    idx = downsample_indices(len(risk), max_points)
    return {"coverage": accepted[idx] / n, "risk": risk[idx], "thresholds": c.thresholds[idx],
            "aurc": aurc, "eaurc": aurc - optimal}


def _curves(p: np.ndarray, y: np.ndarray, names: list[str], max_points: int) -> dict[str, list]:
    pr, roc = [], []
    for k, name in enumerate(names):
        pr.append({"class": name, **precision_recall_curve(p[:, k], y == k, max_points)})
        roc.append({"class": name, **roc_curve(p[:, k], y == k, max_points)})
    return {"pr": pr, "roc": roc}


def classification_report(logits_or_probs: Any, labels: Any, class_names: Sequence[str], *,
                          from_logits: bool = True, topk: Sequence[int] = (1, 5),
                          n_bins: int = 15, max_curve_points: int = 200,
                          pred: Any = None) -> dict[str, Any]:
    """Every metric of this module in one JSON-serialisable dict (NaN becomes None).

    ``pred`` (one class per row, default the argmax of the probabilities) is what the label
    metrics score: accuracy, balanced accuracy, confusion matrix, per-class precision / recall
    / F1 (a decision rule's own answers, e.g. at equal class priors); the probability metrics
    (NLL, Brier, ECE, curves, AUC, top-k, risk-coverage) always read the probabilities.

    ``top_k_accuracy`` holds the ``k`` of ``topk`` that do not exceed the number of classes.
    Per-class ``average_precision`` and ``roc_auc`` are None for a class absent from ``labels``.

    Example:
        >>> r = classification_report([[2.0, 0.0], [0.0, 1.0]], [0, 1], ["cat", "dog"])
        >>> r["accuracy"], r["per_class"][1]["class"]
        (1.0, 'dog')
    """
    p = to_probs(logits_or_probs, from_logits)
    y = as_labels(labels, len(p), p.shape[1])
    names = check_class_names(class_names, p.shape[1])
    n_classes = p.shape[1]
    decided = p.argmax(axis=1) if pred is None else as_labels(pred, len(y), n_classes)
    cm = confusion_matrix(y, decided, n_classes)
    scores = per_class_scores(cm)
    macro, weighted = _averages(scores)
    curves = _curves(p, y, names, max_curve_points)
    rows = cm.sum(axis=1, keepdims=True)
    per_class = [
        {"class": names[k], "precision": scores["precision"][k], "recall": scores["recall"][k],
         "f1": scores["f1"][k], "support": scores["support"][k],
         "average_precision": curves["pr"][k]["average_precision"],
         "roc_auc": curves["roc"][k]["auc"]}
        for k in range(n_classes)
    ]
    aucs = [r["roc_auc"] for r in per_class if r["roc_auc"] is not None]
    aps = [r["average_precision"] for r in per_class if r["average_precision"] is not None]
    cw = classwise_ece(p, y, n_bins)
    report = {
        "n_samples": len(y), "n_classes": n_classes, "class_names": names,
        "accuracy": float(np.mean(decided == y)) if len(y) else None,
        "balanced_accuracy": balanced_accuracy(np.eye(n_classes)[decided], y),
        "top_k_accuracy": {str(k): top_k_accuracy(p, y, k) for k in topk if k <= n_classes},
        "per_class": per_class, "macro_avg": macro, "weighted_avg": weighted,
        "macro_roc_auc": float(np.mean(aucs)) if aucs else None,
        "mean_average_precision": float(np.mean(aps)) if aps else None,
        "confusion_matrix": {
            "counts": cm,
            "normalized": np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0),
        },
        "nll": negative_log_likelihood(p, y), "brier": brier_score(p, y),
        "ece": expected_calibration_error(p, y, n_bins, "equal_width"),
        "adaptive_ece": expected_calibration_error(p, y, n_bins, "adaptive"),
        "classwise_ece": cw["mean"], "classwise_ece_per_class": cw["per_class"],
        "reliability": reliability_bins(p, y, n_bins, "equal_width"),
        "curves": curves,
        "risk_coverage": risk_coverage(p, y, max_points=max_curve_points),
    }
    return json_safe(report)
