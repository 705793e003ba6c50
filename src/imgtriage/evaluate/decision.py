"""The decision rule a bundle carries: temperature, per-class thresholds, abstain, conformal sets.

Prediction and serving call :meth:`DecisionPolicy.decide` on raw logits, so the rule validated
at calibration time is exactly the one applied later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Decisions:
    """What a policy decided for a batch of logits (arrays aligned with the batch)."""

    probs: np.ndarray  # (N, K) calibrated probabilities
    class_id: np.ndarray  # (N,) argmax class, also when abstained
    score: np.ndarray  # (N,) probability of class_id
    abstained: np.ndarray  # (N,) bool: no class passed its threshold
    sets: list[list[int]] | None = None  # conformal prediction sets, when configured


@dataclass(frozen=True)
class DecisionPolicy:
    """Temperature + per-class thresholds + abstain + optional conformal sets.

    ``thresholds`` is None (no thresholds) or one float per class. With ``abstain`` True, an
    input whose top class is below that class's threshold is answered ``unknown_label``.
    ``conformal`` is the dict form of a fitted conformal predictor (see ``evaluate.conformal``).

    ``positive_class`` (an index) makes thresholds decide, not only abstain: an input whose
    positive-class probability reaches that class's threshold is answered positive even when
    another class has the larger probability. This is the recall-first rule of safety review
    (a miss costs more than a false alarm): with ``thresholds=(0.0, 0.2)`` and
    ``positive_class=1``, p(unsafe) = 0.3 answers "unsafe".

    Example:
        >>> p = DecisionPolicy(temperature=2.0, thresholds=(0.7, 0.7), abstain=True)
        >>> p.decide(np.array([[2.0, 1.0], [4.0, 0.0]])).abstained.tolist()  # 0.62, 0.88
        [True, False]
    """

    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None
    abstain: bool = False
    unknown_label: str = "unknown"
    conformal: dict[str, Any] | None = None
    profile: str = "default"
    positive_class: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature} "
                              "(--temperature)")
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
            if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
                raise ConfigError("thresholds must lie in [0, 1] (--thresholds)")
        if self.positive_class is not None:
            if self.thresholds is None:
                raise ConfigError("a positive class needs thresholds to decide with "
                                  "(--positive-class with --threshold-strategy/--thresholds)")
            if not 0 <= int(self.positive_class) < len(self.thresholds):
                raise ConfigError(f"positive class index {self.positive_class} is out of range "
                                  "(--positive-class)")
            object.__setattr__(self, "positive_class", int(self.positive_class))
        if self.conformal is not None:
            from imgtriage.evaluate.conformal import ConformalPredictor

            ConformalPredictor.from_dict(self.conformal)  # a bad block fails on load, not later

    def with_overrides(self, **changes: Any) -> DecisionPolicy:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def decide(self, logits: np.ndarray) -> Decisions:
        probs = softmax(logits, self.temperature)
        class_id = probs.argmax(axis=1)
        if self.thresholds is not None and len(self.thresholds) != probs.shape[1]:
            raise ConfigError(f"{len(self.thresholds)} thresholds for {probs.shape[1]} classes; "
                              "give one threshold per class (--thresholds)")
        positive = np.zeros(len(probs), dtype=bool)
        if self.positive_class is not None:
            k = self.positive_class
            positive = probs[:, k] >= self.thresholds[k]
            class_id = np.where(positive, k, class_id)
        score = probs[np.arange(len(probs)), class_id]
        if self.abstain and self.thresholds is not None:
            abstained = (score < np.asarray(self.thresholds)[class_id]) & ~positive
        else:
            abstained = np.zeros(len(probs), dtype=bool)
        sets = None
        if self.conformal is not None:
            from imgtriage.evaluate.conformal import prediction_sets_from_dict

            sets = prediction_sets_from_dict(self.conformal, probs)
        return Decisions(probs=probs, class_id=class_id, score=score, abstained=abstained,
                         sets=sets)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds) if self.thresholds is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DecisionPolicy:
        if not d:
            return cls()
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)
