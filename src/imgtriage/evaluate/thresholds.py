"""Per-class thresholds: choose them from held-out probabilities, or parse them from the user.

A threshold ``t_k`` means "accept class k when ``p_k >= t_k``" (one-vs-rest on that class's
probability). :class:`~imgtriage.evaluate.decision.DecisionPolicy` applies it to the top class:
an input whose top class scores below its threshold is abstained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._bounds import (
    clopper_pearson_lower,
    min_positives,
    recall_order_statistic,
)
from imgtriage.evaluate._curves import BinaryCounts, binary_counts
from imgtriage.evaluate._validation import as_labels, as_probs, check_choice, not_fitted

STRATEGIES = ("max_f1", "target_precision", "target_recall", "cost")
_EPS = 1e-12


def _at(c: BinaryCounts, i: int | None, threshold: float) -> dict[str, Any]:
    """Precision/recall achieved at candidate ``i`` (None: threshold above every score)."""
    tp = int(c.tp[i]) if i is not None else 0
    fp = int(c.fp[i]) if i is not None else 0
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / c.n_pos if c.n_pos else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else 0.0)
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "fn": c.n_pos - tp, "support": c.n_pos}


def _index_above(c: BinaryCounts) -> int | None:
    """Candidate index for threshold 1.0 (the largest allowed): scores exactly 1.0 still pass."""
    ok = np.flatnonzero(c.thresholds >= 1.0)
    return int(ok[-1]) if len(ok) else None


def _max_f1(c: BinaryCounts) -> tuple[int | None, bool]:
    if c.n_pos == 0:
        return _index_above(c), False
    f1 = 2 * c.tp / (c.tp + c.fp + c.n_pos)  # = 2PR / (P + R)
    return int(np.argmax(f1)), True  # argmax: the first, i.e. highest threshold among ties


def _target_precision(c: BinaryCounts, target: float, delta: float | None = None
                      ) -> tuple[int | None, bool]:
    # precision is not monotone in the threshold: look at every candidate, keep the feasible
    # one with the most true positives (highest recall), and among those the highest threshold
    if delta is None:
        feasible = c.tp >= target * (c.tp + c.fp) - _EPS
    else:  # the precision's Clopper-Pearson lower bound must reach the target
        feasible = clopper_pearson_lower(c.tp, c.tp + c.fp, delta) >= target - _EPS
    feasible &= c.tp > 0
    if c.n_pos == 0 or not feasible.any():
        return _index_above(c), False
    idx = np.flatnonzero(feasible)
    best_tp = c.tp[idx].max()
    return int(idx[c.tp[idx] == best_tp][0]), True


def _target_recall(c: BinaryCounts, target: float) -> tuple[int | None, bool]:
    if c.n_pos == 0:
        return _index_above(c), False
    ok = np.flatnonzero(c.tp >= target * c.n_pos - _EPS)
    return int(ok[0]), True  # recall only grows as the threshold falls: first = highest


def _recall_bound(scores: np.ndarray, positives: np.ndarray, target: float,
                  delta: float) -> dict[str, Any]:
    """Threshold keeping recall >= target with probability >= 1 - delta (see ``_bounds``)."""
    pos = np.sort(scores[positives])
    need = min_positives(target, delta)
    r = recall_order_statistic(len(pos), target, delta)
    info = {"delta": delta, "rests_on_positives": len(pos), "min_positives": need}
    if r is None:
        return {**info, "threshold": 0.0, "note": (
            f"only {len(pos)} validation positives; certifying recall {target} at "
            f"delta {delta} needs >= {need}: threshold 0 (accept every image) until more "
            "labelled positives are added")}
    return {**info, "threshold": float(pos[r - 1]), "note": (
        f"order statistic {r} of {len(pos)} positives: recall >= {target} with "
        f"probability >= {1 - delta:g}")}


def _min_cost(c: BinaryCounts, cost_fn: float, cost_fp: float) -> tuple[int | None, float]:
    costs = cost_fn * (c.n_pos - c.tp) + cost_fp * c.fp
    reject_all = float(cost_fn * c.n_pos)  # threshold 1.0 when no score reaches 1.0
    if len(costs) == 0:
        return None, reject_all
    i = int(np.argmin(costs))
    if reject_all < costs[i] and _index_above(c) is None:
        return None, reject_all
    return i, float(costs[i])


class ThresholdPicker:
    """Choose one threshold per class on held-out probabilities.

    Strategies:
        ``max_f1``: the threshold maximising that class's one-vs-rest F1.
        ``target_precision``: among all thresholds whose precision is >= ``target``, the one
            with the highest recall. If none reaches it the threshold is 1.0 and the class's
            ``achieved_`` entry says ``met: False``.
        ``target_recall``: the highest threshold whose recall is >= ``target``.

    ``delta`` (target strategies): make the target hold on new data with probability
    >= ``1 - delta``, not only on the validation split: recall by an exact order-statistic
    bound, precision by a Clopper-Pearson lower bound (see ``evaluate._bounds``). Each
    class's ``achieved_`` entry then says how many validation positives the threshold rests
    on and how many the bound needs.
        ``cost``: binary problems only: minimise ``cost_fn * FN + cost_fp * FP`` for
            ``positive_class`` (default 1); the other class's threshold is 0 (always accepted).

    With ``positive_class`` set, the other strategies also fit only that class and leave the
    others at 0. Classes absent from the labels get threshold 1.0 and ``met: False``.

    Fitted attributes: ``thresholds_`` (tuple of floats, one per class) and ``achieved_`` (per
    class: threshold, precision, recall, f1, tp, fp, fn, support, met, note).

    Example:
        >>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
        >>> ThresholdPicker("target_recall", target=1.0).fit(probs, [0, 0, 1, 1]).thresholds_
        (0.6, 0.7)
    """

    def __init__(self, strategy: str = "max_f1", target: float | None = None,
                 cost_fn: float = 1.0, cost_fp: float = 1.0,
                 positive_class: int | None = None, delta: float | None = None) -> None:
        self.strategy = strategy
        self.delta = delta
        self.target = target
        self.cost_fn = cost_fn
        self.cost_fp = cost_fp
        self.positive_class = positive_class

    def _check_params(self, n_classes: int) -> None:
        check_choice(self.strategy, STRATEGIES, "threshold strategy", "--threshold-strategy")
        if self.strategy.startswith("target_") and (
                self.target is None or not 0.0 < float(self.target) <= 1.0):
            raise ConfigError(f"strategy {self.strategy!r} needs a target in (0, 1], got "
                              f"{self.target} (--target)")
        if self.strategy == "cost":
            if n_classes != 2:
                raise ConfigError(f"the 'cost' strategy needs a binary problem, got {n_classes} "
                                  "classes; use target_precision or target_recall "
                                  "(--threshold-strategy)")
            if min(self.cost_fn, self.cost_fp) < 0 or self.cost_fn + self.cost_fp <= 0:
                raise ConfigError("costs must be >= 0 and not both 0 (--cost-fn, --cost-fp)")
        if self.delta is not None and not 0.0 < float(self.delta) < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta} (--delta)")
        if self.positive_class is not None and not 0 <= int(self.positive_class) < n_classes:
            raise ConfigError(f"positive_class must be a class index in [0, {n_classes}), got "
                              f"{self.positive_class} (--positive-class)")

    def _fit_class(self, c: BinaryCounts, scores: np.ndarray, positives: np.ndarray
                   ) -> dict[str, Any]:
        note = None
        delta = None if self.delta is None else float(self.delta)
        if self.strategy == "target_recall" and delta is not None and c.n_pos:
            b = _recall_bound(scores, positives, float(self.target), delta)
            ok = np.flatnonzero(c.thresholds >= b["threshold"])
            row = _at(c, int(ok[-1]) if len(ok) else None, b.pop("threshold"))
            return {**row, "met": b["rests_on_positives"] >= b["min_positives"], **b}
        if self.strategy == "cost":
            i, cost = _min_cost(c, float(self.cost_fn), float(self.cost_fp))
            row = _at(c, i, c.thresholds[i] if i is not None else 1.0)
            return {**row, "met": True, "cost": cost, "note": None}
        if self.strategy == "max_f1":
            i, met = _max_f1(c)
        elif self.strategy == "target_precision":
            i, met = _target_precision(c, float(self.target), delta)
            if not met:
                note = (f"no threshold reaches precision {self.target}"
                        + (f" with probability {1 - delta:g}" if delta else "") + "; set to 1.0")
        else:
            i, met = _target_recall(c, float(self.target))
        if c.n_pos == 0:
            note = "class absent from labels; set to 1.0"
        threshold = 1.0 if not met else float(c.thresholds[i])
        row = {**_at(c, i, threshold), "met": met, "note": note}
        if delta is not None and self.strategy.startswith("target_"):
            row.update(delta=delta, rests_on_positives=c.n_pos)
        return row

    def fit(self, probs: Any, labels: Any) -> ThresholdPicker:
        """Choose ``thresholds_`` from probabilities and integer labels of a held-out split."""
        p = as_probs(probs)
        y = as_labels(labels, len(p), p.shape[1])
        n_classes = p.shape[1]
        self._check_params(n_classes)
        fitted = range(n_classes)
        if self.strategy == "cost":
            fitted = [1 if self.positive_class is None else int(self.positive_class)]
        elif self.positive_class is not None:
            fitted = [int(self.positive_class)]
        achieved: list[dict[str, Any]] = []
        for k in range(n_classes):
            c = binary_counts(p[:, k], y == k)
            if k in fitted:
                achieved.append(self._fit_class(c, p[:, k], y == k))
            else:
                achieved.append({**_at(c, len(c.tp) - 1 if len(c.tp) else None, 0.0),
                                 "met": True, "note": "not fitted: always accepted"})
        for a in achieved:  # scores may exceed 1 by rounding; thresholds live in [0, 1]
            a["threshold"] = min(max(float(a["threshold"]), 0.0), 1.0)
        self.thresholds_ = tuple(a["threshold"] for a in achieved)
        self.achieved_ = achieved
        return self

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "thresholds_"):
            raise not_fitted(self)
        return {"strategy": self.strategy, "target": self.target, "cost_fn": self.cost_fn,
                "cost_fp": self.cost_fp, "positive_class": self.positive_class,
                "delta": self.delta,
                "thresholds": list(self.thresholds_), "achieved": self.achieved_}


def _from_mapping(spec: dict[str, Any], names: list[str]) -> list[Any]:
    missing = [n for n in names if n not in spec]
    unknown = [k for k in spec if k not in names]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing classes {missing}")
        if unknown:
            parts.append(f"unknown classes {unknown}")
        raise ConfigError(f"threshold mapping: {'; '.join(parts)}; give one value per class "
                          f"of {names} (--thresholds)")
    return [spec[n] for n in names]


def _load_text(spec: str) -> Any:
    text = spec.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"thresholds are not valid JSON: {exc} (--thresholds)") from exc
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"thresholds {spec!r} is not a number, a JSON list/object, or an "
                          "existing JSON file (--thresholds)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read thresholds from {path}: {exc} (--thresholds)") from exc


def parse_thresholds(spec: Any, class_names: Sequence[str]) -> tuple[float, ...]:
    """One threshold per class from a number, list, dict, JSON text or JSON file path.

    Accepted: ``0.7`` (all classes), ``[0.7, 0.9]`` (output order), ``{"cat": 0.7, "dog": 0.9}``
    (every class named once), the same as JSON text, or a path to a JSON file holding any of
    them (a file may also wrap them as ``{"thresholds": ...}``). Values must lie in [0, 1].

    Example:
        >>> parse_thresholds('{"dog": 0.9, "cat": 0.7}', ["cat", "dog"])
        (0.7, 0.9)
        >>> parse_thresholds("0.5", ["cat", "dog"])
        (0.5, 0.5)
    """
    names = [str(n) for n in class_names]
    value = _load_text(str(spec)) if isinstance(spec, str | Path) else spec
    if isinstance(value, dict) and set(value) == {"thresholds"}:
        value = value["thresholds"]
    if isinstance(value, bool):
        raise ConfigError("thresholds must be numbers, not true/false (--thresholds)")
    if isinstance(value, int | float | np.number):
        values: list[Any] = [value] * len(names)
    elif isinstance(value, dict):
        values = _from_mapping(value, names)
    elif isinstance(value, list | tuple | np.ndarray):
        values = list(value)
        if len(values) != len(names):
            raise ConfigError(f"{len(values)} thresholds for {len(names)} classes {names}; give "
                              "one per class in output order (--thresholds)")
    else:
        raise ConfigError(f"cannot use {type(value).__name__} as thresholds (--thresholds)")
    out = []
    for name, v in zip(names, values, strict=True):
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise ConfigError(f"threshold for {name!r} must be a number, got {v!r} (--thresholds)")
        if not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"threshold for {name!r} must lie in [0, 1], got {v} (--thresholds)")
        out.append(float(v))
    return tuple(out)
