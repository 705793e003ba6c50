"""Fit a whole :class:`DecisionPolicy` from held-out logits in one call (what ``calibrate`` runs).

Order matters: the temperature is fitted first, on the plain logits (it calibrates the
probabilities the policy reports, ``softmax(logits / temperature)``), and thresholds and
conformal quantiles are then fitted on the scores :meth:`DecisionPolicy.decide` applies them
to: :meth:`DecisionPolicy.decision_probabilities` (the same numbers without a prior correction;
with one, those of equal class priors).
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
from imgtriage.evaluate.selective import fit_confidence_threshold
from imgtriage.evaluate.thresholds import ThresholdPicker, parse_thresholds


def fit_decision_policy(logits: Any, labels: Any, *, class_names: Sequence[str],
                        temperature: float | None = None, threshold_strategy: str | None = None,
                        target: float | None = None, cost_fn: float = 1.0, cost_fp: float = 1.0,
                        positive_class: int | None = None, thresholds: Any = None,
                        abstain: bool = False, conformal_method: str | None = None,
                        alpha: float = 0.1, mondrian: bool = False, randomized: bool = True,
                        k_reg: int = 1, lam: float = 0.01, seed: int = 0,
                        unknown_label: str = "unknown", profile: str = "default",
                        target_accuracy: float | None = None, delta: float | None = None,
                        set_abstain: bool = False, allow_empty: bool = False,
                        ood: dict[str, Any] | None = None,
                        prior_correction: Sequence[float] | None = None
                        ) -> tuple[DecisionPolicy, dict[str, Any]]:
    """A fitted policy and a JSON-serialisable summary of how it was chosen.

    ``temperature`` None fits one (:class:`TemperatureScaler`); a number is used as given.
    Thresholds come from ``threshold_strategy`` (see :class:`ThresholdPicker`) or are given as
    ``thresholds`` (anything :func:`parse_thresholds` accepts), not both. ``conformal_method``
    (``"lac"``, ``"aps"``, ``"raps"``) adds prediction sets. Use a calibration split the model
    was not trained on; the summary's numbers are measured on that same split.

    A fitted temperature is kept only when it lowers the validation NLL; otherwise the policy
    keeps T = 1 and the summary's ``temperature.note`` says why. ``target_accuracy`` (instead
    of a threshold strategy) sets one confidence threshold for every class: the lowest whose
    answered validation images reach that accuracy (:func:`fit_confidence_threshold`), with
    abstain on. ``delta`` makes recall/precision targets hold with probability 1 - delta.
    ``ood`` is an out-of-distribution rule that travels with the policy.
    ``prior_correction`` (one log-offset per class, see :class:`DecisionPolicy`) travels with
    it too; the temperature is fitted on the plain logits, so it calibrates the probabilities
    the policy reports (at the validation split's prior, i.e. the training prior), and the
    thresholds, conformal quantiles and abstain summary are fitted on the corrected (equal
    prior) scores the policy decides with. The drift reference holds the reported
    probabilities, which is what a drift check compares (the rows' ``probs``).

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
        temperature, summary["temperature"] = fit_temperature(z, y)
    else:
        summary["temperature"] = {"temperature": float(temperature), "fitted": False}
    offsets = None
    if prior_correction is not None:
        offsets = tuple(float(v) for v in prior_correction)
        if len(offsets) != z.shape[1]:
            from imgtriage.errors import ConfigError

            raise ConfigError(f"{len(offsets)} prior-correction offsets for {z.shape[1]} "
                              "classes; give one per class")
    probs = softmax(z, temperature, offsets)  # what decide() thresholds: the decision scores
    if target_accuracy is not None:
        if threshold_strategy is not None or thresholds is not None:
            from imgtriage.errors import ConfigError

            raise ConfigError("give a target accuracy or a threshold strategy/thresholds, not "
                              "both (--target-accuracy, --threshold-strategy, --thresholds)")
        rule = fit_confidence_threshold(probs, y, target_accuracy)
        picked = ((rule["threshold"],) * len(names), {"strategy": "target_accuracy", **rule})
        abstain = True
    else:
        picked = _thresholds(probs, y, names, threshold_strategy, target, cost_fn, cost_fp,
                             positive_class, thresholds, delta)
    summary["thresholds"] = picked[1]
    conformal = None
    if conformal_method is not None:
        cp = ConformalPredictor(conformal_method, alpha, mondrian=mondrian, randomized=randomized,
                                k_reg=k_reg, lam=lam, seed=seed,
                                allow_empty=allow_empty).fit(probs, y)
        conformal = cp.to_dict()
        summary["conformal"] = {"settings": conformal, **coverage_summary(
            cp.predict_mask(probs), y, n_classes=len(names))}
    policy = DecisionPolicy(temperature=float(temperature), thresholds=picked[0],
                            abstain=abstain, unknown_label=unknown_label, conformal=conformal,
                            profile=profile, ood=ood, set_abstain=set_abstain,
                            positive_class=positive_class if picked[0] is not None else None,
                            prior_correction=offsets)
    decided = policy.decide(z)
    summary["abstain"] = (abstain_summary(probs, y, picked[0], names,
                                          positive_class=policy.positive_class)
                          if picked[0] is not None else None)
    summary["drift_reference"] = reference_summary(decided.probs, decided.abstained,
                                                   class_names=names)
    return policy, json_safe(summary)


def fit_temperature(z: Any, y: Any, sample_weight: Any = None) -> tuple[float, dict[str, Any]]:
    """Fitted T (:class:`TemperatureScaler`) when it lowers the held-out NLL, else 1.0; the
    dict says which and why (``kept``, ``note``), with NLL and ECE before and after.
    ``sample_weight``: the NLL is their weighted mean (e.g. every class counting alike).

    Example:
        >>> z = [[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]]
        >>> t, info = fit_temperature(z, [0, 1, 1, 0])  # half wrong: soften the logits
        >>> t > 1, info["kept"], info["nll_after"] < info["nll_before"]
        (True, True, True)
    """
    scaler = TemperatureScaler().fit(z, y, sample_weight)
    info = scaler.to_dict()
    info["n"] = len(y)
    if scaler.capped_:  # beats T = 1 on NLL (unimodal in log T), or T = 1 breaks the cap too
        info["kept"] = True
        info["note"] = (f"no error on the {len(y)} held-out images: the NLL fit would run "
                        f"to T = {scaler.nll_temperature_:.4f} (every answer near certain); T "
                        f"raised to {scaler.temperature_:.4f}, a mean confidence of "
                        f"{scaler.confidence_cap_:.4f} = (n + 1) / (n + 2)")
        return scaler.temperature_, info
    if scaler.nll_after_ < scaler.nll_before_ - 1e-6:
        info["kept"] = True
        info["note"] = None
        if scaler.ece_after_ > scaler.ece_before_:
            info["note"] = (f"NLL (the criterion) fell {scaler.nll_before_:.4f} -> "
                            f"{scaler.nll_after_:.4f} while the 15-bin ECE rose "
                            f"{scaler.ece_before_:.4f} -> {scaler.ece_after_:.4f}; binned ECE on "
                            f"{len(y)} images is noisy, NLL is a proper score")
        return scaler.temperature_, info
    info.update(temperature=1.0, kept=False, fitted_temperature=scaler.temperature_,
                nll_after=scaler.nll_before_, ece_after=scaler.ece_before_,
                note=f"kept T = 1: the fitted T = {scaler.temperature_:.4f} did not lower the "
                     f"validation NLL ({scaler.nll_before_:.4f})")
    return 1.0, info


def _thresholds(probs: Any, y: Any, names: list[str], strategy: str | None,
                target: float | None, cost_fn: float, cost_fp: float,
                positive_class: int | None, given: Any, delta: float | None = None
                ) -> tuple[tuple[float, ...] | None, Any]:
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
                             positive_class=positive_class, delta=delta).fit(probs, y)
    return picker.thresholds_, picker.to_dict()
