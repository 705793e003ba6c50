"""What a decision rule actually answers on labelled data, abstentions included.

The metrics of :func:`~imgtriage.evaluate.metrics.classification_report` are threshold-free:
they score the top class. A deployed bundle answers by its :class:`DecisionPolicy` instead:
a recall-first rule calls an input "unsafe" as soon as p(unsafe) reaches a low threshold, and
an abstaining rule answers "unknown" (a human reviews it). This module scores those answers:
the confusion matrix with an extra column for abstentions, per-class recall / misses / review
counts, and the failure gallery of the rule (e.g. the defects it let through).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from imgtriage.evaluate._gallery import failure_cases
from imgtriage.evaluate._validation import as_labels, check_class_names, json_safe
from imgtriage.evaluate.decision import Decisions


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _per_class(cm: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    k = len(names)
    rows = []
    for c, name in enumerate(names):
        support = int(cm[c].sum())
        correct, review = int(cm[c, c]), int(cm[c, k])
        answered_as = int(cm[:, c].sum())
        rows.append({"class": name, "support": support, "correct": correct,
                     "missed": support - correct - review, "abstained": review,
                     "recall": _ratio(correct, support),
                     "miss_rate": _ratio(support - correct - review, support),
                     "abstain_rate": _ratio(review, support),
                     "answered_as": answered_as,
                     "precision": _ratio(correct, answered_as)})
    return rows


def decision_outcomes(decisions: Decisions, labels: Any, class_names: Sequence[str],
                      paths: Sequence[Any], *, unknown_label: str = "unknown",
                      rule: dict[str, Any] | None = None,
                      gallery_per_class: int = 5, n_confused_pairs: int = 10
                      ) -> dict[str, Any]:
    """Score the answers of a decision rule against true labels.

    ``confusion_matrix`` has one row per true class and one column per answered class plus a
    last column ``unknown_label`` (abstained: sent to review). Per class, ``recall`` counts only
    correct answers (an abstention is not a hit), ``missed`` counts answers of another class,
    ``abstained`` the inputs sent to review. ``failures`` is the failure gallery of the answers
    (abstentions are not failures). ``rule`` is stored as given (e.g. the policy's dict).

    Example:
        >>> from imgtriage.evaluate.decision import DecisionPolicy
        >>> policy = DecisionPolicy(thresholds=(0.0, 0.2), positive_class=1)
        >>> d = policy.decide(np.log(np.array([[0.9, 0.1], [0.7, 0.3], [0.95, 0.05]])))
        >>> out = decision_outcomes(d, [1, 1, 0], ["safe", "unsafe"], ["a", "b", "c"])
        >>> out["per_class"][1]["recall"], out["per_class"][1]["missed"]
        (0.5, 1)
    """
    names = check_class_names(class_names, decisions.probs.shape[1])
    k = len(names)
    y = as_labels(labels, len(decisions.probs), k)
    pred = np.asarray(decisions.class_id, dtype=np.int64)
    abstained = np.asarray(decisions.abstained, dtype=bool)
    answered = np.where(abstained, k, pred)
    cm = np.bincount(y * (k + 1) + answered, minlength=k * (k + 1)).reshape(k, k + 1)
    n, n_answered = len(y), int((~abstained).sum())
    correct = int(((pred == y) & ~abstained).sum())
    paths = [str(p) for p in paths]
    return json_safe({
        "rule": rule, "columns": [*names, unknown_label],
        "confusion_matrix": cm, "n_samples": n,
        "coverage": _ratio(n_answered, n), "abstain_count": n - n_answered,
        "accuracy": _ratio(correct, n), "accuracy_at_coverage": _ratio(correct, n_answered),
        "errors": n_answered - correct,
        "per_class": _per_class(cm, names),
        "failures": failure_cases(decisions.probs, y, names, paths, gallery_per_class,
                                  n_confused_pairs, pred=pred, exclude=abstained),
    })
