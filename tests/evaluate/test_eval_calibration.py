"""Temperature scaling: argmax kept, NLL never worse on the fit data, known T recovered."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.errors import ConfigError, DataError
from imgtriage.evaluate import TemperatureScaler, nll_at_temperature, softmax
from imgtriage.evaluate.calibration import T_MAX, T_MIN, confidence_cap
from imgtriage.evaluate.policy import fit_temperature


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


# --- the confidence cap: a held-out set with no errors ----------------------------------------

def _sampled(n: int, rng: np.random.Generator, scale: float = 6.0) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Logits of a calibrated 4-class model (labels drawn from softmax(z)) that is right
    ~88% of the time."""
    z = rng.normal(size=(n, 4)) * scale
    p = softmax(z)
    y = np.array([rng.choice(4, p=row) for row in p])
    return z, y


def test_no_errors_on_validation_no_longer_runs_the_temperature_to_its_bound() -> None:
    rng = np.random.default_rng(0)
    z, y = _sampled(4000, rng)
    right = np.flatnonzero(z.argmax(1) == y)
    zv, yv = z[right[:150]], y[right[:150]]  # a split of 150 the model gets all right
    zt, yt = _sampled(20000, rng)  # new data from the same model
    plain = TemperatureScaler(cap_confidence=False).fit(zv, yv)
    capped = TemperatureScaler().fit(zv, yv)
    assert plain.temperature_ == pytest.approx(0.05)  # the NLL runs to T_MIN
    assert capped.capped_ and capped.temperature_ > 2 * T_MIN
    cap = confidence_cap(zv, yv)
    assert cap == pytest.approx(151 / 152)
    assert softmax(zv, capped.temperature_).max(1).mean() == pytest.approx(cap, abs=1e-6)
    # on new data the capped temperature is far better; the plain one is near-certain of errors
    assert nll_at_temperature(zt, yt, capped.temperature_) < \
        0.5 * nll_at_temperature(zt, yt, plain.temperature_)
    t, info = fit_temperature(zv, yv)
    assert t == capped.temperature_ and info["kept"]
    assert info["confidence_cap"] == pytest.approx(cap)
    assert "raised" in info["note"] and "no error" in info["note"]


def test_the_cap_leaves_a_fit_on_data_with_errors_alone() -> None:
    z, y = _sampled(3000, np.random.default_rng(1))  # ~12% errors: T = 1 is right
    ts = TemperatureScaler().fit(z, y)
    assert not ts.capped_
    assert ts.temperature_ == TemperatureScaler(cap_confidence=False).fit(z, y).temperature_
    assert ts.temperature_ == pytest.approx(1.0, abs=0.1)
    assert "confidence_cap" not in ts.to_dict()


def test_confidence_cap_only_without_errors_and_with_weights() -> None:
    z = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 2)
    y = z.argmax(1)  # 8 of 8 right
    assert confidence_cap(z, y) == pytest.approx(9 / 10)
    assert confidence_cap(z, y, np.full(8, 3.0)) == pytest.approx(9 / 10)  # scale-free
    w = np.array([1.0] * 6 + [3.0] * 2)  # effective n = 144 / 24 = 6
    assert confidence_cap(z, y, w) == pytest.approx(7 / 8)
    wrong = y.copy()
    wrong[0] = 1
    assert confidence_cap(z, wrong) is None
    assert confidence_cap(z, wrong, np.array([0.0] + [1.0] * 7)) == pytest.approx(8 / 9)
