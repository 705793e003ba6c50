"""The decision rule a bundle carries: temperature, per-class thresholds, abstain, conformal sets.

Prediction and serving call :meth:`DecisionPolicy.decide` on raw logits, so the rule validated
at calibration time is exactly the one applied later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError


def softmax(logits: np.ndarray, temperature: float = 1.0,
            offsets: np.ndarray | tuple[float, ...] | None = None) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature + offsets`` in float64, numerically stable
    (``offsets``: one per class, e.g. a policy's ``prior_correction``; None adds nothing)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if offsets is not None:
        z = z + np.asarray(offsets, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Decisions:
    """What a policy decided for a batch of logits (arrays aligned with the batch)."""

    probs: np.ndarray  # (N, K) reported probabilities: calibrated at the training prior
    class_id: np.ndarray  # (N,) the decided class (argmax of decision_probs), also when abstained
    score: np.ndarray  # (N,) reported probability of class_id
    abstained: np.ndarray  # (N,) bool: no class passed its threshold, or out of distribution
    sets: list[list[int]] | None = None  # conformal prediction sets, when configured
    reason: list[str | None] = field(default_factory=list)  # why abstained (REASONS), or None
    # (N, K) the scores the rule decides with (argmax, thresholds, sets): the probabilities at
    # equal class priors under a prior correction, else ``probs`` itself; None = ``probs``
    decision_probs: np.ndarray | None = None


MAX_PRIOR_OFFSET = 50.0  # |log prior| of a class 1e-21 as frequent as another: far beyond data

# Why an input was abstained on, in the order they take precedence.
REASONS = ("out_of_distribution", "low_confidence", "ambiguous")


@dataclass(frozen=True)
class DecisionPolicy:
    """Temperature + per-class thresholds + abstain + optional conformal sets.

    ``thresholds`` is None (no thresholds) or one float per class. With ``abstain`` True, an
    input whose top class is below that class's threshold is answered ``unknown_label``.
    ``conformal`` is the dict form of a fitted conformal predictor (see ``evaluate.conformal``).

    ``ood`` is the out-of-distribution rule (dict of ``evaluate.ood.KnnOOD.rule()``): an
    input whose OOD score (passed to :meth:`decide`) exceeds ``ood["threshold"]`` is abstained
    on with reason ``out_of_distribution``, whatever its confidence. ``set_abstain`` abstains
    (reason ``ambiguous``) when the conformal set is not a single class.

    ``prior_correction`` (one number per class, or None): ``-log`` of the class prior the model
    learned (logit adjustment, Menon et al. 2021), set by ``train`` when it selects by balanced
    accuracy. The policy then keeps two sets of numbers apart:

    - it *decides* at equal class priors, the decision that maximises balanced accuracy: the
      argmax, the thresholds (abstain and ``positive_class``) and the conformal sets all read
      :meth:`decision_probabilities`, ``softmax(logits / temperature + prior_correction)``.
      Every threshold and conformal quantile is fitted on validation on these same scores
      (:func:`~imgtriage.evaluate.policy.fit_decision_policy`), so what it certified there
      (precision, recall, accuracy of the answered, coverage) is counted on the validation
      images at their own prior and holds for the rule as applied; and a bundle written before
      the two were told apart decides exactly as it did.
    - it *reports* :meth:`probabilities`, ``softmax(logits / temperature)``, with the
      temperature fitted on the plain logits of the validation split: the posterior at the
      training prior, the one probability calibrated on data like the training data
      (``Decisions.probs`` and ``score``, the rows' ``probs``, ``score`` and top-k values).

    So an input can be answered with a minority class whose reported probability is below
    0.5: the model thinks it is less likely than not, and the rule answers it anyway because
    at equal priors it wins (the recall a reviewer asks for when a miss costs more than a
    false alarm). :meth:`describe_priors` says this in words. Without a correction the two are
    the same numbers.

    ``positive_class`` (an index) makes thresholds decide, not only abstain: an input whose
    positive-class probability reaches that class's threshold is answered positive even when
    another class has the larger probability. This is the recall-first rule of safety review
    (a miss costs more than a false alarm): with ``thresholds=(0.0, 0.2)`` and
    ``positive_class=1``, p(unsafe) = 0.3 answers "unsafe".

    Example:
        >>> p = DecisionPolicy(temperature=2.0, thresholds=(0.7, 0.7), abstain=True)
        >>> p.decide(np.array([[2.0, 1.0], [4.0, 0.0]])).abstained.tolist()  # 0.62, 0.88
        [True, False]
        >>> q = DecisionPolicy(prior_correction=(-1.0, 1.0))  # class 1 seen e^2 times rarer
        >>> d = q.decide(np.array([[1.0, 0.0]]))
        >>> d.class_id.tolist(), d.score.round(3).tolist()  # answered 1 at p = 0.269
        ([1], [0.269])
    """

    temperature: float = 1.0
    thresholds: tuple[float, ...] | None = None
    abstain: bool = False
    unknown_label: str = "unknown"
    conformal: dict[str, Any] | None = None
    profile: str = "default"
    positive_class: int | None = None
    ood: dict[str, Any] | None = None
    set_abstain: bool = False
    prior_correction: tuple[float, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature} "
                              "(--temperature)")
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
            if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
                raise ConfigError("thresholds must lie in [0, 1] (--thresholds)")
        if self.prior_correction is not None:
            values = tuple(float(v) for v in self.prior_correction)
            if not values or not all(np.isfinite(v) and abs(v) <= MAX_PRIOR_OFFSET
                                     for v in values):
                raise ConfigError("a prior correction is one finite log-offset per class, each "
                                  f"within +-{MAX_PRIOR_OFFSET:g}; retrain or recalibrate the "
                                  "bundle (--prior-correction)")
            object.__setattr__(self, "prior_correction", values)
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
        if self.set_abstain and self.conformal is None:
            raise ConfigError("abstaining on ambiguous sets needs conformal sets "
                              "(--conformal-method)")
        if self.ood is not None and not isinstance(self.ood.get("threshold"), int | float):
            raise ConfigError("the OOD rule needs a numeric 'threshold'; retrain or recalibrate "
                              "the bundle")

    def with_overrides(self, **changes: Any) -> DecisionPolicy:
        """A copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def decide(self, logits: np.ndarray, ood_scores: np.ndarray | None = None) -> Decisions:
        """Apply the rule to raw logits; ``ood_scores`` (one per row, higher = stranger) are
        needed when the policy has an OOD rule (rows without a score: NaN, never refused)."""
        probs = self.probabilities(logits)
        dprobs = self.decision_probabilities(logits)
        class_id = dprobs.argmax(axis=1)
        if self.thresholds is not None and len(self.thresholds) != probs.shape[1]:
            raise ConfigError(f"{len(self.thresholds)} thresholds for {probs.shape[1]} classes; "
                              "give one threshold per class (--thresholds)")
        positive = np.zeros(len(probs), dtype=bool)
        if self.positive_class is not None:
            k = self.positive_class
            positive = dprobs[:, k] >= self.thresholds[k]
            class_id = np.where(positive, k, class_id)
        rows = np.arange(len(probs))
        if self.abstain and self.thresholds is not None:
            low = (dprobs[rows, class_id] < np.asarray(self.thresholds)[class_id]) & ~positive
        else:
            low = np.zeros(len(probs), dtype=bool)
        sets = None
        if self.conformal is not None:
            from imgtriage.evaluate.conformal import prediction_sets_from_dict

            sets = prediction_sets_from_dict(self.conformal, dprobs)
        ambiguous = np.array([self.set_abstain and len(s) != 1 for s in sets or [[]] * len(probs)],
                             dtype=bool)
        ood = self.ood_mask(ood_scores, len(probs)) & self.abstain
        reason = [("out_of_distribution" if o else "low_confidence" if lo else
                   "ambiguous" if a else None) for o, lo, a in zip(ood, low, ambiguous,
                                                                   strict=True)]
        return Decisions(probs=probs, class_id=class_id, score=probs[rows, class_id],
                         abstained=ood | low | ambiguous, sets=sets, reason=reason,
                         decision_probs=dprobs)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """``softmax(logits / temperature)``: the probabilities the policy reports, calibrated
        at the training prior (the prior correction never enters them)."""
        return softmax(logits, self.temperature)

    def decision_probabilities(self, logits: np.ndarray) -> np.ndarray:
        """``softmax(logits / temperature + prior_correction)``: the scores the rule decides
        with (argmax, thresholds, conformal sets); :meth:`probabilities` without a correction."""
        z = np.asarray(logits, dtype=np.float64)
        if self.prior_correction is not None and len(self.prior_correction) != z.shape[1]:
            raise ConfigError(f"{len(self.prior_correction)} prior-correction offsets for "
                              f"{z.shape[1]} classes; retrain or recalibrate the bundle")
        return softmax(z, self.temperature, self.prior_correction)

    def describe_priors(self) -> str:
        """What the policy decides at and reports, in words (``inspect``, train output)."""
        if self.prior_correction is None:
            return "decides and reports probabilities at the training prior"
        return "decides at equal class priors; reports probabilities at the training prior"

    def ood_mask(self, ood_scores: np.ndarray | None, n: int) -> np.ndarray:
        """True where the OOD score exceeds the rule's threshold (False without a rule)."""
        if self.ood is None or ood_scores is None:
            return np.zeros(n, dtype=bool)
        s = np.asarray(ood_scores, dtype=np.float64).reshape(-1)
        if len(s) != n:
            raise ConfigError(f"{len(s)} OOD scores for {n} inputs; they must align")
        with np.errstate(invalid="ignore"):
            return s > float(self.ood["threshold"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds) if self.thresholds is not None else None
        d["prior_correction"] = (list(self.prior_correction)
                                 if self.prior_correction is not None else None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DecisionPolicy:
        if not d:
            return cls()
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)
