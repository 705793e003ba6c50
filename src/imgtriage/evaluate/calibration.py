"""Temperature scaling: one scalar that makes softmax confidences honest, argmax unchanged.

The temperature is chosen on held-out logits by minimising the negative log-likelihood over
``log T`` (a bounded, unimodal 1-D problem). It is clamped to ``[0.05, 20]`` so enormous
logits give a usable temperature instead of 0 or infinity.

A held-out set the model gets all right cannot tell how confident the model should be: the
NLL keeps falling as ``T -> 0`` and the fit runs to the bound, with every answer at
probability 1.0 (seen on a 413-chip MSTAR validation split with no error: T = 0.05, test NLL
0.256 against 0.037 at the test's own best T). So the fit is capped (:func:`confidence_cap`)
when the held-out set has no error: the mean top-class confidence may not exceed Laplace's
rule of succession ``(n + 1) / (n + 2)``; where the NLL optimum is more confident, T is raised
(bisection: the mean confidence falls as T rises) until it is not. With one error or more the
NLL has a finite optimum and is kept: a cap on the *mean* confidence would tie together images
the model is sure of and images it cannot tell apart, which one NLL fit keeps apart.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._validation import as_labels, as_scores, not_fitted
from imgtriage.evaluate.decision import softmax
from imgtriage.evaluate.metrics import expected_calibration_error

T_MIN, T_MAX = 0.05, 20.0


def _nll_and_grad(log_t: Any, z: np.ndarray, y: np.ndarray, w: np.ndarray | None = None
                  ) -> tuple[float, float]:
    """Exact mean NLL of ``softmax(z / T)`` and its derivative in ``log T`` (the mean
    weighted by ``w`` when given)."""
    beta = math.exp(-float(np.ravel(log_t)[0]))
    s = z * beta
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    tot = e.sum(axis=1)
    rows = np.arange(len(y))
    p = e / tot[:, None]
    nll_rows = np.log(tot) - s[rows, y]
    d_rows = (p * z).sum(axis=1) - z[rows, y]
    nll = float(np.average(nll_rows, weights=w))
    d_beta = float(np.average(d_rows, weights=w))
    return nll, -beta * d_beta


def nll_at_temperature(logits: Any, labels: Any, temperature: float) -> float:
    """Mean NLL of ``softmax(logits / temperature)``, computed exactly in log space.

    Example:
        >>> round(nll_at_temperature([[0.0, 0.0]], [0], 1.0), 4)
        0.6931
    """
    z = as_scores(logits, "logits")
    y = as_labels(labels, len(z), z.shape[1])
    return _nll_and_grad(math.log(temperature), z, y)[0]


def confidence_cap(logits: Any, labels: Any, sample_weight: Any = None) -> float | None:
    """``(n + 1) / (n + 2)`` (Laplace's rule of succession) when the argmax gets every held-out
    image right, the highest mean top-class confidence n right answers support; None (no cap)
    when there is an error. With weights, n is the effective sample size
    ``(sum w)^2 / sum w^2`` of the images with a positive weight.

    Example:
        >>> round(confidence_cap([[2.0, 0.0]] * 8, [0] * 8), 4)  # 8 of 8 right
        0.9
        >>> confidence_cap([[2.0, 0.0]] * 8, [0] * 7 + [1]) is None
        True
    """
    z = as_scores(logits, "logits")
    y = as_labels(labels, len(z), z.shape[1])
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    if not (z.argmax(axis=1) == y)[w > 0].all():
        return None
    n = float(w.sum() ** 2 / (w * w).sum())
    return (n + 1.0) / (n + 2.0)


def _mean_confidence(z: np.ndarray, temperature: float, w: np.ndarray | None) -> float:
    return float(np.average(softmax(z, temperature).max(axis=1), weights=w))


def _raise_to_cap(z: np.ndarray, w: np.ndarray | None, temperature: float, cap: float
                  ) -> float:
    """The lowest T >= ``temperature`` whose mean top-class confidence is at most ``cap``
    (the confidence falls as T rises), by bisection over ``log T``; T_MAX at most."""
    if _mean_confidence(z, temperature, w) <= cap:
        return temperature
    lo, hi = math.log(temperature), math.log(T_MAX)
    if _mean_confidence(z, T_MAX, w) > cap:
        return T_MAX
    for _ in range(50):  # |hi - lo| < 1e-13 in log T
        mid = 0.5 * (lo + hi)
        if _mean_confidence(z, math.exp(mid), w) > cap:
            lo = mid
        else:
            hi = mid
    return float(math.exp(hi))


class TemperatureScaler:
    """Fit one temperature on held-out logits; ``transform`` returns calibrated probabilities.

    Parameters:
        init: starting temperature (also kept as a candidate, so the result is never worse).
        max_iter: iteration limit of the bounded L-BFGS-B search over ``log T``.
        n_bins: bins of the ECE reported before and after.
        cap_confidence: raise T where the NLL optimum's mean confidence exceeds
            :func:`confidence_cap` (see the module docstring); False: the plain NLL optimum.

    Fitted attributes: ``temperature_``, ``nll_before_`` (at T = 1), ``nll_after_``,
    ``ece_before_``, ``ece_after_``, ``n_iter_``, ``confidence_cap_`` (None when off or
    when the held-out set has an error),
    ``nll_temperature_`` (the temperature before the cap; equal to ``temperature_`` when it did
    not bind).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> logits = rng.normal(size=(200, 3)) * 5
        >>> labels = logits.argmax(1)
        >>> ts = TemperatureScaler().fit(logits, labels)
        >>> ts.nll_after_ <= ts.nll_before_
        True
    """

    def __init__(self, init: float = 1.0, max_iter: int = 100, n_bins: int = 15,
                 cap_confidence: bool = True) -> None:
        self.init = init
        self.max_iter = max_iter
        self.n_bins = n_bins
        self.cap_confidence = cap_confidence

    def _check_params(self) -> None:
        if not (T_MIN <= float(self.init) <= T_MAX):
            raise ConfigError(f"initial temperature must lie in [{T_MIN}, {T_MAX}], "
                              f"got {self.init} (--temperature)")
        if int(self.max_iter) < 1:
            raise ConfigError(f"max_iter must be >= 1, got {self.max_iter}")

    def fit(self, logits: Any, labels: Any, sample_weight: Any = None) -> TemperatureScaler:
        """Choose the temperature minimising NLL of ``labels`` under ``softmax(logits / T)``
        (the NLL's mean weighted by ``sample_weight`` when given; the ECE stays unweighted)."""
        from scipy.optimize import minimize

        self._check_params()
        z = as_scores(logits, "logits")
        y = as_labels(labels, len(z), z.shape[1])
        if len(y) == 0:
            raise ConfigError("cannot fit a temperature on zero samples; give a calibration split")
        w = None
        if sample_weight is not None:
            w = np.asarray(sample_weight, np.float64)
            if w.shape != (len(y),) or not (np.isfinite(w).all() and (w >= 0).all()
                                             and w.sum() > 0):
                raise ConfigError(f"sample weights must be {len(y)} finite numbers >= 0 "
                                  "with a positive sum")
        lo, hi = math.log(T_MIN), math.log(T_MAX)
        res = minimize(_nll_and_grad, x0=np.array([math.log(self.init)]), args=(z, y, w),
                       jac=True, method="L-BFGS-B", bounds=[(lo, hi)],
                       options={"maxiter": int(self.max_iter)})
        # keep the best of the optimum, the start, T = 1 and the bounds: never worse than T = 1
        candidates = [float(np.clip(res.x[0], lo, hi)), math.log(self.init), 0.0, lo, hi]
        nlls = [_nll_and_grad(c, z, y, w)[0] for c in candidates]
        best = int(np.argmin(nlls))
        self.nll_temperature_ = float(np.clip(math.exp(candidates[best]), T_MIN, T_MAX))
        self.confidence_cap_ = confidence_cap(z, y, w) if self.cap_confidence else None
        self.temperature_ = self.nll_temperature_
        if self.confidence_cap_ is not None:  # no error on the held-out set
            self.temperature_ = _raise_to_cap(z, w, self.nll_temperature_, self.confidence_cap_)
        self.nll_before_ = _nll_and_grad(0.0, z, y, w)[0]
        self.nll_after_ = (_nll_and_grad(math.log(self.temperature_), z, y, w)[0]
                           if self.capped_ else min(nlls[best], self.nll_before_))
        self.ece_before_ = expected_calibration_error(softmax(z), y, self.n_bins)
        self.ece_after_ = expected_calibration_error(softmax(z, self.temperature_), y, self.n_bins)
        self.n_iter_ = int(res.nit)
        return self

    @property
    def capped_(self) -> bool:
        """True when the confidence cap raised T above the NLL optimum."""
        if not hasattr(self, "temperature_"):
            raise not_fitted(self)
        return self.temperature_ > self.nll_temperature_

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``."""
        if not hasattr(self, "temperature_"):
            raise not_fitted(self)
        return softmax(as_scores(logits, "logits"), self.temperature_)

    def fit_transform(self, logits: Any, labels: Any) -> np.ndarray:
        return self.fit(logits, labels).transform(logits)

    def to_dict(self) -> dict[str, Any]:
        """The fitted numbers, JSON-serialisable (for the bundle's validation metrics)."""
        if not hasattr(self, "temperature_"):
            raise not_fitted(self)
        out = {"temperature": self.temperature_, "nll_before": self.nll_before_,
               "nll_after": self.nll_after_, "ece_before": self.ece_before_,
               "ece_after": self.ece_after_}
        if self.capped_:
            out.update(confidence_cap=self.confidence_cap_, nll_temperature=self.nll_temperature_)
        return out
