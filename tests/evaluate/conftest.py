"""Simulated model outputs shared by the evaluate tests (plain arrays, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.evaluate import softmax


def simulate(n: int = 3000, k: int = 10, seed: int = 0,
             overconfidence: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated (labels drawn from it) when ``overconfidence`` is 1.

    With ``overconfidence`` > 1 the returned logits are scaled up, so the model is
    over-confident by exactly that temperature.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    z[np.arange(n), rng.integers(0, k, n)] += 2.5
    p = softmax(z)
    labels = (p.cumsum(axis=1) > rng.random(n)[:, None]).argmax(axis=1)
    return z * overconfidence, labels


@pytest.fixture(scope="session")
def well_calibrated() -> tuple[np.ndarray, np.ndarray]:
    return simulate(overconfidence=1.0, seed=1)


@pytest.fixture(scope="session")
def over_confident() -> tuple[np.ndarray, np.ndarray]:
    return simulate(overconfidence=3.0, seed=2)
