"""Finite-sample bounds that make a validation-set target hold on new data.

Recall (an order-statistic bound, exact): take the ``n`` validation scores of the positive
class and accept ``score >= s_(r)``, the ``r``-th smallest. For continuous scores the miss
rate of that threshold on new positives, ``F(s_(r))``, is Beta(r, n + 1 - r) distributed, so

    P(recall >= target) = P(F(s_(r)) <= 1 - target) = P(Binomial(n, 1 - target) >= r).

The largest ``r`` whose probability is at least ``1 - delta`` gives the highest threshold that
keeps the target with confidence ``1 - delta`` (ties in the scores only make it safer). When
even ``r = 1`` fails, i.e. ``target ** n > delta``, the validation positives are too few:
``n >= log(delta) / log(target)`` are needed (59 for 0.95 at delta 0.05).

Precision: the Clopper-Pearson lower bound of ``tp / (tp + fp)`` at each candidate threshold;
a threshold is feasible when that bound reaches the target. The bound is exact for one
threshold fixed in advance; scanning many thresholds makes it approximate (documented).
"""

from __future__ import annotations

import math

import numpy as np


def recall_order_statistic(n_pos: int, target: float, delta: float) -> int | None:
    """The largest ``r`` in 1..n with ``P(Binomial(n, 1 - target) >= r) >= 1 - delta``.

    None when no ``r`` qualifies (too few positives). Accepting positives at or above the
    ``r``-th smallest validation score then keeps recall >= target with prob. >= 1 - delta.

    Example:
        >>> recall_order_statistic(200, 0.95, 0.05)  # 5 of 200 may fall below the threshold
        5
        >>> recall_order_statistic(50, 0.95, 0.05) is None  # 0.95 ** 50 = 0.077 > 0.05
        True
    """
    from scipy.stats import binom

    if n_pos < 1:
        return None
    r = np.arange(1, n_pos + 1)
    ok = binom.sf(r - 1, n_pos, 1.0 - target) >= 1.0 - delta
    return int(r[ok].max()) if ok.any() else None


def min_positives(target: float, delta: float) -> int:
    """Fewest validation positives for which a recall target can be certified at ``delta``.

    Example:
        >>> min_positives(0.95, 0.05)
        59
    """
    if target >= 1.0:
        return 10**9
    return math.ceil(math.log(delta) / math.log(target))


def clopper_pearson_lower(k: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """One-sided ``1 - delta`` lower confidence bound of a binomial proportion ``k / n``.

    Example:
        >>> round(float(clopper_pearson_lower(np.array([20]), np.array([20]), 0.05)[0]), 3)
        0.861
    """
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros(np.broadcast(k, n).shape)
    pos = k > 0
    out[pos] = beta.ppf(delta, k[pos], (n - k + 1)[pos])
    return out
