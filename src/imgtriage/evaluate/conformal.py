"""Split conformal prediction sets: a set of classes that holds the true one with probability
at least ``1 - alpha`` (over exchangeable calibration and test data), whatever the model.

A score ``s(x, y)`` says how unusual label ``y`` is for ``x``; ``qhat`` is the
``k = ceil((n + 1)(1 - alpha))``-th smallest calibration score (``+inf`` when ``k > n``, so every
set is then the full label set); a test input's set is ``{y : s(x, y) <= qhat}``.

Scores: ``lac`` ``1 - p_y``; ``aps`` the probability mass of the classes ranked at or above
``y`` (randomised: mass above ``y`` plus ``u * p_y``); ``raps`` APS plus
``lam * max(0, rank(y) - k_reg)``. ``mondrian=True`` keeps one ``qhat`` per class from that
class's calibration scores, which gives coverage per class rather than on average.

Randomisation is reproducible: ``u`` is a seeded hash of the row's probabilities (a
counter-free, keyed random number), so an input gets the same set on every run, in any batch,
in any order. Because ``u`` is then a fixed function of the input, the coverage guarantee holds
exactly as for a deterministic score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._validation import (
    as_labels,
    as_probs,
    check_alpha,
    check_choice,
    json_safe,
    not_fitted,
)

METHODS = ("lac", "aps", "raps")
DICT_KIND = "split_conformal"
DICT_VERSION = 1

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_G = np.uint64(_GOLDEN)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def conformal_quantile(scores: Any, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score, or ``inf`` when that exceeds ``n``.

    Example:
        >>> conformal_quantile([0.1, 0.2, 0.3, 0.4], alpha=0.2)  # k = ceil(5 * 0.8) = 4
        0.4
        >>> conformal_quantile([0.1, 0.2, 0.3], alpha=0.2)  # k = ceil(3.2) = 4 > 3
        inf
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(s)
    # exact rational arithmetic: (n + 1) * 0.9 must not round up to the next integer
    k = math.ceil((n + 1) * (1 - Fraction(repr(float(check_alpha(alpha))))))
    return float(s[k - 1]) if 1 <= k <= n else math.inf


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_uniforms(probs: np.ndarray, seed: int) -> np.ndarray:
    """One number in (0, 1) per row: a seeded splitmix64 hash of the row's float32 values."""
    p = np.ascontiguousarray(probs, dtype=np.float32)
    bits = p.view(np.uint32).astype(np.uint64)
    h = _mix(np.full(len(p), np.uint64(int(seed) & _MASK64), dtype=np.uint64) + _G)
    for j in range(p.shape[1]):
        h = _mix(h ^ (bits[:, j] + np.uint64((_GOLDEN * (j + 1)) & _MASK64)))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(2**53)


def conformal_scores(probs: Any, method: str = "lac", *, randomized: bool = False,
                     k_reg: int = 1, lam: float = 0.01, seed: int = 0) -> np.ndarray:
    """Score ``s(x, y)`` of every candidate label, shape (N, K); lower means more plausible.

    Example:
        >>> conformal_scores([[0.7, 0.2, 0.1]], "aps").round(2).tolist()
        [[0.7, 0.9, 1.0]]
    """
    p = as_probs(probs)
    check_choice(method, METHODS, "conformal method", "--conformal-method")
    if method == "lac":
        return 1.0 - p
    order = np.argsort(-p, axis=1, kind="stable")
    ps = np.take_along_axis(p, order, axis=1)
    s = np.cumsum(ps, axis=1)
    if randomized:
        s = s - (1.0 - row_uniforms(p, seed))[:, None] * ps
    if method == "raps":
        s = s + lam * np.maximum(0, np.arange(1, p.shape[1] + 1) - k_reg)
    out = np.empty_like(s)
    np.put_along_axis(out, order, s, axis=1)
    return out


def _qhat_to_json(q: Any) -> Any:
    if isinstance(q, np.ndarray):
        return [_qhat_to_json(v) for v in q.tolist()]
    return "inf" if math.isinf(q) else float(q)


def _qhat_from_json(q: Any) -> float | np.ndarray:
    def one(v: Any) -> float:
        if v == "inf" or (isinstance(v, float) and math.isinf(v) and v > 0):
            return math.inf
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"conformal qhat values must be numbers or 'inf', got {v!r}; "
                              "recalibrate (imgtriage calibrate)")
        return float(v)

    if isinstance(q, list | tuple | np.ndarray):
        return np.array([one(v) for v in q], dtype=np.float64)
    return one(q)


class ConformalPredictor:
    """Split conformal prediction sets from calibrated probabilities.

    An empty set (possible with randomised APS/RAPS or a small ``qhat``) tells a user
    nothing; unless ``allow_empty`` it gets the top class instead (coverage can only rise).

    Fitted attributes: ``qhat_`` (float, or one per class with ``mondrian=True``),
    ``n_calibration_`` and ``n_per_class_``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> probs = rng.dirichlet(np.ones(4), size=500)
        >>> labels = np.array([rng.choice(4, p=r) for r in probs])
        >>> cp = ConformalPredictor("aps", alpha=0.1, randomized=True).fit(probs, labels)
        >>> sets = cp.predict_sets(probs[:3])
        >>> sets == prediction_sets_from_dict(cp.to_dict(), probs[:3])
        True
    """

    def __init__(self, method: str = "lac", alpha: float = 0.1, mondrian: bool = False,
                 randomized: bool = False, k_reg: int = 1, lam: float = 0.01,
                 seed: int = 0, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty
        self.method = method
        self.alpha = alpha
        self.mondrian = mondrian
        self.randomized = randomized
        self.k_reg = k_reg
        self.lam = lam
        self.seed = seed

    def _check_params(self) -> None:
        check_choice(self.method, METHODS, "conformal method", "--conformal-method")
        check_alpha(self.alpha)
        if int(self.k_reg) < 0 or float(self.lam) < 0:
            raise ConfigError(f"RAPS needs k_reg >= 0 and lam >= 0, got {self.k_reg}, "
                              f"{self.lam} (--raps-k-reg, --raps-lambda)")
        if int(self.seed) < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed} (--seed)")

    def scores(self, probs: Any) -> np.ndarray:
        """Scores of every candidate label under this predictor's settings, shape (N, K)."""
        return conformal_scores(probs, self.method, randomized=bool(self.randomized),
                                k_reg=int(self.k_reg), lam=float(self.lam), seed=int(self.seed))

    def fit(self, probs: Any, labels: Any) -> ConformalPredictor:
        """Compute ``qhat_`` from calibration probabilities and labels (not the training set)."""
        self._check_params()
        p = as_probs(probs)
        y = as_labels(labels, len(p), p.shape[1])
        true_scores = self.scores(p)[np.arange(len(y)), y]
        self.n_calibration_ = len(y)
        self.n_per_class_ = np.bincount(y, minlength=p.shape[1])
        if self.mondrian:
            self.qhat_ = np.array([conformal_quantile(true_scores[y == k], self.alpha)
                                   for k in range(p.shape[1])])
        else:
            self.qhat_ = conformal_quantile(true_scores, self.alpha)
        return self

    def predict_mask(self, probs: Any) -> np.ndarray:
        """Boolean (N, K): True where a class is in the input's prediction set."""
        if not hasattr(self, "qhat_"):
            raise not_fitted(self)
        p = as_probs(probs)
        qhat = np.asarray(self.qhat_, dtype=np.float64)
        if qhat.ndim == 1 and len(qhat) != p.shape[1]:
            raise ConfigError(f"conformal predictor has {len(qhat)} per-class quantiles but the "
                              f"model has {p.shape[1]} classes; recalibrate (imgtriage calibrate)")
        mask = self.scores(p) <= (qhat[None, :] if qhat.ndim == 1 else qhat)
        if not self.allow_empty:
            empty = ~mask.any(axis=1)
            mask[np.flatnonzero(empty), p[empty].argmax(axis=1)] = True
        return mask

    def predict_sets(self, probs: Any) -> list[list[int]]:
        """Prediction set per row, classes listed from most to least probable."""
        mask = self.predict_mask(probs)
        order = np.argsort(-np.asarray(probs, dtype=np.float64), axis=1, kind="stable")
        in_order = np.take_along_axis(mask, order, axis=1)
        return [o[m].tolist() for o, m in zip(order, in_order, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form for the bundle; an infinite ``qhat`` is the string "inf"."""
        if not hasattr(self, "qhat_"):
            raise not_fitted(self)
        return {"kind": DICT_KIND, "version": DICT_VERSION, "method": self.method,
                "alpha": float(self.alpha), "mondrian": bool(self.mondrian),
                "randomized": bool(self.randomized), "k_reg": int(self.k_reg),
                "lam": float(self.lam), "seed": int(self.seed),
                "allow_empty": bool(self.allow_empty),
                "qhat": _qhat_to_json(self.qhat_), "n_calibration": int(self.n_calibration_),
                "n_per_class": [int(v) for v in self.n_per_class_]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalPredictor:
        """Rebuild a fitted predictor from :meth:`to_dict` output."""
        if not isinstance(d, dict) or d.get("kind", DICT_KIND) != DICT_KIND:
            raise ConfigError("conformal settings must be a dict written by "
                              "ConformalPredictor.to_dict(); recalibrate (imgtriage calibrate)")
        if d.get("version", DICT_VERSION) != DICT_VERSION:
            raise ConfigError(f"conformal settings version {d.get('version')} is not supported "
                              f"(expected {DICT_VERSION}); recalibrate (imgtriage calibrate)")
        missing = [k for k in ("method", "alpha", "qhat") if k not in d]
        if missing:
            raise ConfigError(f"conformal settings lack {missing}; recalibrate "
                              "(imgtriage calibrate)")
        cp = cls(method=d["method"], alpha=d["alpha"], mondrian=bool(d.get("mondrian", False)),
                 randomized=bool(d.get("randomized", False)), k_reg=int(d.get("k_reg", 1)),
                 lam=float(d.get("lam", 0.01)), seed=int(d.get("seed", 0)),
                 allow_empty=bool(d.get("allow_empty", False)))
        cp._check_params()
        cp.qhat_ = _qhat_from_json(d["qhat"])
        if cp.mondrian != isinstance(cp.qhat_, np.ndarray):
            raise ConfigError("conformal settings: 'mondrian' needs one qhat per class and "
                              "marginal a single qhat; recalibrate (imgtriage calibrate)")
        cp.n_calibration_ = int(d.get("n_calibration", 0))
        n_per_class = d.get("n_per_class", [])
        cp.n_per_class_ = np.asarray(n_per_class, dtype=np.int64)
        return cp


def prediction_sets_from_dict(d: dict[str, Any], probs: Any) -> list[list[int]]:
    """Prediction sets from a saved predictor (what a bundle's decision policy carries).

    Example:
        >>> d = {"method": "lac", "alpha": 0.1, "qhat": 0.5}
        >>> prediction_sets_from_dict(d, [[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]])
        [[0], [0, 1]]
    """
    return ConformalPredictor.from_dict(d).predict_sets(probs)


def coverage_summary(sets: Sequence[Sequence[int]] | np.ndarray, labels: Any,
                     n_classes: int | None = None) -> dict[str, Any]:
    """Empirical coverage and set sizes; with ``n_classes``, coverage per true class too.

    ``sets`` is a list of class-id lists or a boolean (N, K) mask.

    Example:
        >>> coverage_summary([[0], [0, 1], []], [0, 1, 1])["coverage"]
        0.6666666666666666
    """
    if isinstance(sets, np.ndarray) and sets.dtype == bool and sets.ndim == 2:
        y = np.asarray(labels, dtype=np.int64)
        if len(y) != len(sets):
            raise ConfigError(f"{len(sets)} sets for {len(y)} labels; they must align")
        hit = sets[np.arange(len(y)), y] if len(y) else np.zeros(0, bool)
        sizes = sets.sum(axis=1)
    else:
        y = np.asarray(labels, dtype=np.int64)
        if len(y) != len(sets):
            raise ConfigError(f"{len(sets)} sets for {len(y)} labels; they must align")
        hit = np.array([int(t) in set(s) for s, t in zip(sets, y, strict=True)], dtype=bool)
        sizes = np.array([len(s) for s in sets], dtype=np.int64)
    n = len(y)
    out: dict[str, Any] = {
        "n_samples": n,
        "coverage": float(hit.mean()) if n else None,
        "mean_set_size": float(sizes.mean()) if n else None,
        "singleton_rate": float(np.mean(sizes == 1)) if n else None,
        "empty_rate": float(np.mean(sizes == 0)) if n else None,
    }
    if n_classes is not None:
        out["per_class_coverage"] = [float(hit[y == k].mean()) if np.any(y == k) else None
                                     for k in range(n_classes)]
    return json_safe(out)
