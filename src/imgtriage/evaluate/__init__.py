"""Evaluate and calibrate on plain arrays: metrics, temperature, thresholds, abstain,
conformal sets, drift checks and the HTML/JSON report.

Everything here takes logits or probabilities, integer labels and paths, never a model, so it
runs anywhere and is tested without one. The decision rule that travels in a bundle is
:class:`DecisionPolicy`; :func:`fit_decision_policy` fits one from a calibration split.
"""

from imgtriage.evaluate.abstain import abstain_mask, abstain_summary
from imgtriage.evaluate.calibration import TemperatureScaler, nll_at_temperature
from imgtriage.evaluate.conformal import (
    ConformalPredictor,
    conformal_quantile,
    conformal_scores,
    coverage_summary,
    prediction_sets_from_dict,
)
from imgtriage.evaluate.decision import DecisionPolicy, Decisions, softmax
from imgtriage.evaluate.drift import drift_check, reference_summary
from imgtriage.evaluate.metrics import (
    accuracy,
    balanced_accuracy,
    brier_score,
    classification_report,
    classwise_ece,
    confusion_matrix,
    expected_calibration_error,
    negative_log_likelihood,
    per_class_scores,
    precision_recall_curve,
    reliability_bins,
    risk_coverage,
    roc_curve,
    to_probs,
    top_k_accuracy,
)
from imgtriage.evaluate.outcomes import decision_outcomes
from imgtriage.evaluate.policy import fit_decision_policy, fit_temperature
from imgtriage.evaluate.report import build_report, render_html, write_report
from imgtriage.evaluate.thresholds import ThresholdPicker, parse_thresholds

__all__ = [
    "ConformalPredictor",
    "DecisionPolicy",
    "Decisions",
    "TemperatureScaler",
    "ThresholdPicker",
    "abstain_mask",
    "abstain_summary",
    "accuracy",
    "balanced_accuracy",
    "brier_score",
    "build_report",
    "classification_report",
    "classwise_ece",
    "conformal_quantile",
    "conformal_scores",
    "confusion_matrix",
    "coverage_summary",
    "decision_outcomes",
    "drift_check",
    "expected_calibration_error",
    "fit_decision_policy",
    "fit_temperature",
    "negative_log_likelihood",
    "nll_at_temperature",
    "parse_thresholds",
    "per_class_scores",
    "precision_recall_curve",
    "prediction_sets_from_dict",
    "reference_summary",
    "reliability_bins",
    "render_html",
    "risk_coverage",
    "roc_curve",
    "softmax",
    "to_probs",
    "top_k_accuracy",
    "write_report",
]
