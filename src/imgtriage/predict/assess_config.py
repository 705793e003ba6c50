"""What ``imgtriage evaluate`` / ``evaluate_bundle`` can be told, as one frozen record.

Each field carries its ``--help`` text in ``metadata["help"]`` (``cli/_options.py`` builds the
command's options from them; ``metadata["switch"]`` marks a plain on-switch such as ``--tta``);
errors name the CLI flag that sets the value. No heavy imports here: the CLI imports this
module at start-up.

Example:
    >>> cfg = EvaluateConfig(split="test", tta=True)
    >>> cfg.batch_size, cfg.drift_alpha
    (64, 0.01)
    >>> EvaluateConfig(batch_size=0)
    Traceback (most recent call last):
    ...
    imgtriage.errors.ConfigError: batch_size must be >= 1, got 0 (--batch-size)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class EvaluateConfig:
    """An evaluation's settings. ``reference`` set: a drift check of the data against that
    evaluation directory or calibrated bundle instead (``drift_alpha`` its significance)."""

    split: str | None = _f(None, "Only this split of a manifest (train/val/test/calib).")
    tta: bool = _f(False, "Test-time augmentation (bundle policy).", switch=True)
    profile: str | None = _f(None, "Evaluate under a saved decision profile.")
    reference: Path | None = field(default=None, metadata={"help": (
        "Drift check instead: compare DATA's score, class and abstain distributions with an "
        "evaluation directory or calibrated bundle.")})
    drift_alpha: float = _f(0.01, "Significance level of the drift tests.")
    batch_size: int = _f(64, "Images per inference batch.")
    ood: Path | None = field(default=None, metadata={"help": (
        "A folder of images of none of the bundle's classes: report how well the bundle's OOD "
        "score and max-softmax tell them from DATA (AUROC, FPR at 95% TPR) and how many the "
        "rule refuses.")})

    def __post_init__(self) -> None:
        for name in ("reference", "ood"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size} (--batch-size)")
        if not 0 < self.drift_alpha < 1:
            raise ConfigError(f"drift_alpha must be between 0 and 1, got {self.drift_alpha} "
                              "(--drift-alpha)")


STRATEGIES = ("max_f1", "target_precision", "target_recall", "cost")
CONFORMAL_METHODS = ("lac", "aps", "raps")


@dataclass(frozen=True)
class CalibrateConfig:
    """A calibration's settings (``imgtriage calibrate``): the split to fit on, the decision
    rule to fit (temperature, thresholds, abstain, conformal sets, the OOD rule) and the
    profile it is stored under. ``positive_class`` is a class *name* of the bundle."""

    split: str | None = _f(None, "Only this split of a manifest.")
    temperature: float | None = _f(None, "Use this temperature instead of fitting one by NLL.")
    threshold_strategy: str | None = _f(None, "max_f1, target_precision, target_recall or "
                                              "cost (binary).")
    target: float | None = _f(None, "Precision or recall target for the strategy.")
    thresholds: str | None = _f(None, "Explicit thresholds: a number, a list, JSON (list or "
                                      "{class: t}) or a JSON file. On a bundle that decides at "
                                      "equal class priors (see inspect) every threshold reads "
                                      "the equal-prior scores, not the reported probabilities.")
    cost_fn: float = _f(1.0, "Cost of a miss (cost strategy).")
    cost_fp: float = _f(1.0, "Cost of a false alarm (cost strategy).")
    positive_class: str | None = _f(None, "Class name that counts as positive (e.g. unsafe).")
    abstain: bool = _f(False, "Answer 'unknown' when no class passes its threshold.",
                       switch=True)
    conformal_method: str | None = _f(None, "Conformal prediction sets: lac, aps or raps.")
    alpha: float = _f(0.1, "Conformal miscoverage level (0.1 -> 90% sets).")
    mondrian: bool = _f(False, "Class-conditional coverage.", switch=True)
    allow_empty: bool = _f(False, "Let conformal sets be empty (default: an empty set gets "
                                  "the top class).", switch=True)
    set_abstain: bool = _f(False, "Abstain (reason 'ambiguous') when the conformal set is not "
                                  "one class.", switch=True)
    target_accuracy: float | None = _f(None, "Instead of a threshold strategy: one confidence "
                                             "threshold for every class, the lowest whose "
                                             "answered images reach this accuracy (the rule "
                                             "train writes by default).")
    delta: float | None = _f(None, "With target_recall/target_precision: make the target hold "
                                   "on new data with probability 1 - delta (exact "
                                   "order-statistic / Clopper-Pearson bound), e.g. 0.05.")
    ood: bool = _f(True, "Keep the bundle's out-of-distribution rule (its threshold re-chosen "
                         "on DATA).")
    ood_accept: float | None = _f(None, "Re-choose the OOD threshold so that this share of "
                                        "DATA is accepted (default: the bundle's own, 0.95 "
                                        "from train); e.g. 0.975 where new images drift from "
                                        "validation and only far-off junk must be refused "
                                        "(docs/unknowns.md).")
    profile: str = _f("default", "Name of this decision rule; 'default' is applied by "
                                 "predict/serve with no flags.")
    make_default: bool | None = _f(None, "Make this profile the bundle's default rule.",
                                   flag="--make-default/--keep-default")

    def __post_init__(self) -> None:
        if self.threshold_strategy not in (None, *STRATEGIES):
            raise ConfigError(f"threshold_strategy must be one of {', '.join(STRATEGIES)}, got "
                              f"{self.threshold_strategy!r} (--threshold-strategy)")
        if self.conformal_method not in (None, *CONFORMAL_METHODS):
            raise ConfigError(f"conformal_method must be lac, aps or raps, got "
                              f"{self.conformal_method!r} (--conformal-method)")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be between 0 and 1, got {self.alpha} (--alpha)")
        for name in ("target", "target_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {value} "
                                  f"(--{name.replace('_', '-')})")
        if self.ood_accept is not None and not 0 < self.ood_accept < 1:
            raise ConfigError(f"ood_accept must be between 0 and 1, got {self.ood_accept} "
                              "(--ood-accept)")
        if self.ood_accept is not None and not self.ood:
            raise ConfigError("--ood-accept re-chooses the OOD rule's threshold; it cannot go "
                              "with --no-ood")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta must be between 0 and 1, got {self.delta} (--delta)")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature} "
                              "(--temperature)")
        if not self.profile:
            raise ConfigError("profile needs a name (--profile)")

    def fit_options(self, classes: list[str]) -> dict[str, Any]:
        """The keywords of ``imgtriage.evaluate.fit_decision_policy`` (the positive class as
        its index in ``classes``)."""
        pos = None
        if self.positive_class is not None:
            if self.positive_class not in classes:
                raise ConfigError(f"--positive-class {self.positive_class!r} is not one of "
                                  f"{classes}")
            pos = classes.index(self.positive_class)
        skip = ("split", "profile", "make_default", "positive_class", "ood_accept")
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip},
                "positive_class": pos, "profile": self.profile}


@dataclass(frozen=True)
class EvaluateOutput:
    """Where ``imgtriage evaluate`` writes (``evaluate_bundle``'s ``out``; None: the default
    the command names, ``drift.json`` for a drift check)."""

    out: Path | None = field(default=None, metadata={
        "help": "Where report.json, report.html and the figures (confusion_matrix.png, ...) "
                "go (default: BUNDLE/../eval).", "short": "-o"})


@dataclass(frozen=True)
class CalibrateOutput:
    """Where ``calibrate_bundle`` writes the new bundle version (None: in place)."""

    out: Path | None = field(default=None, metadata={
        "help": "Write the new bundle version here instead of in place.", "short": "-o"})
