"""Has the input changed since calibration? Three cheap tests on model outputs alone.

At calibration time :func:`reference_summary` stores the top-class scores (at most 5000, a
seeded subsample), the predicted-class counts and the abstain count. Later,
:func:`drift_check` compares a batch of new outputs against it:

- top-class score distribution: two-sample Kolmogorov–Smirnov test;
- predicted-class distribution: chi-square goodness of fit, expected counts from the reference
  proportions (each reference count gets +0.5 so a class never seen there does not divide by 0);
- abstain rate: two-proportion z test.

A test flags ``shift`` when its p-value is below ``alpha``. No labels are needed.

The scores are a policy's *reported* probabilities (the rows' ``probs``); a reference says so
with ``"probabilities": "reported"``. One without that key was written before a prior-corrected
policy reported probabilities at the training prior: it holds that policy's equal-prior scores
(see ``imgtriage.predict.assess.drift_against``, which compares like with like).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._validation import as_probs, check_alpha, json_safe

REFERENCE_VERSION = 1
MAX_REFERENCE_SCORES = 5000


def _abstained_count(abstained: Any, n: int) -> int | None:
    if abstained is None:
        return None
    a = np.asarray(abstained, dtype=bool)
    if a.shape != (n,):
        raise ConfigError(f"abstained must be one flag per row ({n}), got shape {a.shape}")
    return int(a.sum())


def reference_summary(probs: Any, abstained: Any = None, *,
                      class_names: Sequence[str] | None = None,
                      max_samples: int = MAX_REFERENCE_SCORES, seed: int = 0) -> dict[str, Any]:
    """What :func:`drift_check` compares against, JSON-serialisable (save it with the bundle).

    Example:
        >>> ref = reference_summary([[0.9, 0.1], [0.3, 0.7]], abstained=[False, True])
        >>> ref["class_counts"], ref["abstain_count"]
        ([1, 1], 1)
    """
    p = as_probs(probs)
    n = len(p)
    top = p.max(axis=1)
    if n > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
        top = top[keep]
    return json_safe({
        "version": REFERENCE_VERSION,
        "probabilities": "reported",
        "n_samples": n,
        "class_names": list(class_names) if class_names is not None else None,
        "max_scores": np.round(top, 6),
        "class_counts": np.bincount(p.argmax(axis=1), minlength=p.shape[1]),
        "abstain_count": _abstained_count(abstained, n),
    })


def _ks(ref_scores: np.ndarray, cur_scores: np.ndarray, alpha: float) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    if len(ref_scores) == 0 or len(cur_scores) == 0:
        return {"statistic": None, "p_value": None, "shift": False, "note": "no samples"}
    res = ks_2samp(ref_scores, cur_scores)
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue),
            "shift": bool(res.pvalue < alpha), "reference_mean": float(ref_scores.mean()),
            "current_mean": float(cur_scores.mean())}


def _chi_square(ref_counts: np.ndarray, cur_counts: np.ndarray, alpha: float) -> dict[str, Any]:
    from scipy.stats import chi2

    n_cur = int(cur_counts.sum())
    if len(ref_counts) < 2 or n_cur == 0:
        return {"statistic": None, "p_value": None, "shift": False, "note": "fewer than 2 "
                "classes or no samples"}
    smoothed = ref_counts + 0.5
    expected = smoothed / smoothed.sum() * n_cur
    stat = float(np.sum((cur_counts - expected) ** 2 / expected))
    dof = len(ref_counts) - 1
    p = float(chi2.sf(stat, dof))
    return {"statistic": stat, "p_value": p, "dof": dof, "shift": bool(p < alpha),
            "observed": cur_counts, "expected": expected}


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """z statistic and two-sided p-value for ``x1/n1`` against ``x2/n2`` (pooled variance).

    Example:
        >>> two_proportion_z(10, 100, 10, 100)
        (0.0, 1.0)
    """
    from scipy.stats import norm

    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x2 / n2 - x1 / n1) / se
    return float(z), float(2 * norm.sf(abs(z)))


def _abstain_test(reference: dict[str, Any], n_cur: int, x_cur: int | None,
                  alpha: float) -> dict[str, Any] | None:
    x_ref, n_ref = reference.get("abstain_count"), int(reference.get("n_samples", 0))
    if x_cur is None or x_ref is None or n_ref == 0 or n_cur == 0:
        return None
    z, p = two_proportion_z(int(x_ref), n_ref, x_cur, n_cur)
    return {"statistic": z, "p_value": p, "shift": bool(p < alpha),
            "reference_rate": x_ref / n_ref, "current_rate": x_cur / n_cur}


def _check_reference(reference: dict[str, Any], names: list[str], n_classes: int) -> None:
    if not isinstance(reference, dict) or "class_counts" not in reference:
        raise ConfigError("drift reference must be the dict reference_summary() returned")
    if reference.get("version", REFERENCE_VERSION) != REFERENCE_VERSION:
        raise ConfigError(f"drift reference version {reference.get('version')} is not "
                          f"supported (expected {REFERENCE_VERSION}); recalibrate")
    if len(reference["class_counts"]) != n_classes or len(names) != n_classes:
        raise ConfigError(f"drift reference has {len(reference['class_counts'])} classes, the "
                          f"current outputs {n_classes} and class_names {len(names)}")
    ref_names = reference.get("class_names")
    if ref_names is not None and list(ref_names) != names:
        raise ConfigError(f"drift reference classes {ref_names} differ from {names}; the "
                          "reference belongs to another model")


def drift_check(reference: dict[str, Any], current_probs: Any, *, class_names: Sequence[str],
                abstained: Any = None, alpha: float = 0.01) -> dict[str, Any]:
    """Compare new outputs with a :func:`reference_summary`; ``shift`` is True if any test fires.

    ``abstain_rate`` is None unless both the reference and this call carry abstain flags.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ref = reference_summary(rng.dirichlet([5, 1], size=500))
        >>> drift_check(ref, rng.dirichlet([1, 5], size=500), class_names=["a", "b"])["shift"]
        True
    """
    alpha = check_alpha(alpha, "--drift-alpha")
    p = as_probs(current_probs, "current_probs")
    names = [str(c) for c in class_names]
    _check_reference(reference, names, p.shape[1])
    ref_scores = np.asarray(reference.get("max_scores") or [], dtype=np.float64)
    ref_counts = np.asarray(reference["class_counts"], dtype=np.float64)
    cur_counts = np.bincount(p.argmax(axis=1), minlength=p.shape[1]).astype(np.float64)
    tests = {
        "max_score": _ks(ref_scores, p.max(axis=1), alpha),
        "predicted_class": _chi_square(ref_counts, cur_counts, alpha),
        "abstain_rate": _abstain_test(reference, len(p), _abstained_count(abstained, len(p)),
                                      alpha),
    }
    shift = any(t is not None and t["shift"] for t in tests.values())
    return json_safe({"alpha": alpha, "n_reference": reference.get("n_samples"),
                      "n_current": len(p), "class_names": names, **tests, "shift": shift})
