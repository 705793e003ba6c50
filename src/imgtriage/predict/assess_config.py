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

from dataclasses import dataclass, field
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
