"""Temperature scaling: argmax kept, NLL never worse on the fit data, known T recovered."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.errors import ConfigError, DataError
from imgtriage.evaluate import TemperatureScaler, nll_at_temperature, softmax
from imgtriage.evaluate.calibration import T_MAX, T_MIN


def _labels_from(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (probs.cumsum(axis=1) > rng.random(len(probs))[:, None]).argmax(axis=1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [0.3, 1.0, 5.0, 40.0])
def test_argmax_kept_and_nll_not_raised(seed, scale):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(400, 6)) * scale
    labels = _labels_from(softmax(z / max(scale, 1.0) * 1.5), rng)  # over-confident when large
    ts = TemperatureScaler().fit(z, labels)
    probs = ts.transform(z)
    np.testing.assert_array_equal(probs.argmax(axis=1), z.argmax(axis=1))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert ts.nll_after_ <= ts.nll_before_ + 1e-12
    assert nll_at_temperature(z, labels, ts.temperature_) <= nll_at_temperature(z, labels, 1.0)
    assert T_MIN <= ts.temperature_ <= T_MAX


@pytest.mark.parametrize("true_t", [0.5, 2.0, 4.0])
def test_recovers_known_temperature(true_t):
    rng = np.random.default_rng(7)
    z = rng.normal(size=(6000, 5)) * 3.0
    labels = _labels_from(softmax(z, true_t), rng)
    ts = TemperatureScaler().fit(z, labels)
    assert abs(ts.temperature_ - true_t) / true_t < 0.10
    assert ts.ece_after_ < ts.ece_before_


def test_over_confident_fixture_is_cooled(over_confident):
    z, labels = over_confident
    ts = TemperatureScaler().fit(z, labels)
    assert 2.5 < ts.temperature_ < 3.5  # the fixture is over-confident by exactly T = 3
    assert ts.ece_after_ < 0.03 < ts.ece_before_


def test_huge_and_separable_logits_stay_finite_and_clamped():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 4)) * 1e6
    ts = TemperatureScaler().fit(z, z.argmax(axis=1))  # perfectly separable
    assert T_MIN <= ts.temperature_ <= T_MAX and np.isfinite(ts.nll_after_)
    assert np.all(np.isfinite(ts.transform(z)))
    wrong = (z.argmax(axis=1) + 1) % 4  # every label wrong: wants T -> infinity
    ts = TemperatureScaler().fit(z, wrong)
    assert ts.temperature_ == pytest.approx(T_MAX)
    assert ts.nll_after_ < ts.nll_before_
    sep = rng.normal(size=(300, 3)) * 5
    assert TemperatureScaler().fit(sep, sep.argmax(1)).temperature_ == pytest.approx(T_MIN)


def test_errors():
    with pytest.raises(ConfigError, match="fit"):
        TemperatureScaler().transform(np.zeros((1, 2)))
    with pytest.raises(ConfigError, match="--temperature"):
        TemperatureScaler(init=100.0).fit(np.zeros((2, 2)), [0, 1])
    with pytest.raises(DataError):
        TemperatureScaler().fit(np.zeros((2, 2)), [0, 2])
    with pytest.raises(DataError):
        TemperatureScaler().fit(np.array([[np.nan, 0.0]]), [0])


def test_to_dict_is_plain():
    import json

    ts = TemperatureScaler().fit(np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [0, 1, 1])
    d = json.loads(json.dumps(ts.to_dict()))
    assert d["temperature"] == ts.temperature_


def test_sample_weights_are_row_repeats():
    """Weights 1, 2, 3 fit what repeating each row that many times fits; uniform weights
    change nothing; bad weights are refused."""
    rng = np.random.default_rng(4)
    z = rng.normal(size=(60, 3)) * 4
    y = np.where(rng.random(60) < 0.7, z.argmax(1), rng.integers(0, 3, 60))
    w = rng.integers(1, 4, 60)
    weighted = TemperatureScaler().fit(z, y, sample_weight=w)
    repeated = TemperatureScaler().fit(np.repeat(z, w, axis=0), np.repeat(y, w))
    assert weighted.temperature_ == pytest.approx(repeated.temperature_, rel=1e-4)
    assert weighted.nll_after_ == pytest.approx(repeated.nll_after_, rel=1e-6)
    plain = TemperatureScaler().fit(z, y)
    assert TemperatureScaler().fit(z, y, sample_weight=np.full(60, 0.5)).temperature_ == \
        pytest.approx(plain.temperature_, rel=1e-6)
    assert weighted.temperature_ != pytest.approx(plain.temperature_, rel=1e-3)
    for bad in (np.ones(59), -np.ones(60), np.zeros(60)):
        with pytest.raises(ConfigError):
            TemperatureScaler().fit(z, y, sample_weight=bad)
