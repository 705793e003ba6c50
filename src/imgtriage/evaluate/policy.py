"""Fit a whole :class:`DecisionPolicy` from held-out logits in one call (what ``calibrate`` runs).

Order matters: the temperature is fitted first, and thresholds and conformal quantiles are then
fitted on the *calibrated* probabilities, because :meth:`DecisionPolicy.decide` applies them to
``softmax(logits / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imgtriage.evaluate._validation import as_labels, as_scores, check_class_names, json_safe
from imgtriage.evaluate.abstain import abstain_summary
from imgtriage.evaluate.calibration import TemperatureScaler
from imgtriage.evaluate.conformal import ConformalPredictor, coverage_summary
from imgtriage.evaluate.decision import DecisionPolicy, softmax
from imgtriage.evaluate.drift import reference_summary
from imgtriage.evaluate.thresholds import ThresholdPicker, parse_thresholds


def fit_decision_policy(logits: Any, labels: Any, *, class_names: Sequence[str],
                        temperature: float | None = None, threshold_strategy: str | None = None,
                        target: float | None = None, cost_fn: float = 1.0, cost_fp: float = 1.0,
                        positive_class: int | None = None, thresholds: Any = None,
                        abstain: bool = False, conformal_method: str | None = None,
                        alpha: float = 0.1, mondrian: bool = False, randomized: bool = True,
                        k_reg: int = 1, lam: float = 0.01, seed: int = 0,
                        unknown_label: str = "unknown",
                        profile: str = "default") -> tuple[DecisionPolicy, dict[str, Any]]:
    """A fitted policy and a JSON-serialisable summary of how it was chosen.

    ``temperature`` None fits one (:class:`TemperatureScaler`); a number is used as given.
    Thresholds come from ``threshold_strategy`` (see :class:`ThresholdPicker`) or are given as
    ``thresholds`` (anything :func:`parse_thresholds` accepts), not both. ``conformal_method``
    (``"lac"``, ``"aps"``, ``"raps"``) adds prediction sets. Use a calibration split the model
    was not trained on; the summary's numbers are measured on that same split.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> logits = rng.normal(size=(300, 3)) * 3
        >>> labels = logits.argmax(1)
        >>> policy, summary = fit_decision_policy(
        ...     logits, labels, class_names=["a", "b", "c"], threshold_strategy="target_precision",
        ...     target=0.9, abstain=True, conformal_method="lac")
        >>> sorted(summary)
        ['abstain', 'class_names', 'conformal', 'drift_reference', 'temperature', 'thresholds']
    """
    z = as_scores(logits, "logits")
    y = as_labels(labels, len(z), z.shape[1])
    names = check_class_names(class_names, z.shape[1])
    summary: dict[str, Any] = {"class_names": names}
    if temperature is None:
        scaler = TemperatureScaler().fit(z, y)
        temperature = scaler.temperature_
        summary["temperature"] = scaler.to_dict()
    else:
        summary["temperature"] = {"temperature": float(temperature), "fitted": False}
    probs = softmax(z, temperature)
    picked = _thresholds(probs, y, names, threshold_strategy, target, cost_fn, cost_fp,
                         positive_class, thresholds)
    summary["thresholds"] = picked[1]
    conformal = None
    if conformal_method is not None:
        cp = ConformalPredictor(conformal_method, alpha, mondrian=mondrian, randomized=randomized,
                                k_reg=k_reg, lam=lam, seed=seed).fit(probs, y)
        conformal = cp.to_dict()
        summary["conformal"] = {"settings": conformal, **coverage_summary(
            cp.predict_mask(probs), y, n_classes=len(names))}
    policy = DecisionPolicy(temperature=float(temperature), thresholds=picked[0],
                            abstain=abstain, unknown_label=unknown_label, conformal=conformal,
                            profile=profile,
                            positive_class=positive_class if picked[0] is not None else None)
    decided = policy.decide(z)
    summary["abstain"] = (abstain_summary(probs, y, picked[0], names,
                                          positive_class=policy.positive_class)
                          if picked[0] is not None else None)
    summary["drift_reference"] = reference_summary(probs, decided.abstained, class_names=names)
    return policy, json_safe(summary)


def _thresholds(probs: Any, y: Any, names: list[str], strategy: str | None,
                target: float | None, cost_fn: float, cost_fp: float,
                positive_class: int | None, given: Any) -> tuple[tuple[float, ...] | None, Any]:
    from imgtriage.errors import ConfigError

    if strategy is not None and given is not None:
        raise ConfigError("give either a threshold strategy or explicit thresholds, not both "
                          "(--threshold-strategy, --thresholds)")
    if given is not None:
        values = parse_thresholds(given, names)
        return values, {"strategy": "given", "thresholds": list(values)}
    if strategy is None:
        return None, None
    picker = ThresholdPicker(strategy, target=target, cost_fn=cost_fn, cost_fp=cost_fp,
                             positive_class=positive_class).fit(probs, y)
    return picker.thresholds_, picker.to_dict()
