"""Split conformal: coverage over many random splits, Mondrian, the k > n edge, round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from imgtriage.errors import ConfigError
from imgtriage.evaluate import (
    ConformalPredictor,
    conformal_quantile,
    coverage_summary,
    prediction_sets_from_dict,
    softmax,
)

ALPHA = 0.1
N_SPLITS = 200


def _split_coverages(probs, labels, n_splits=N_SPLITS, **kwargs):
    """Marginal and per-class test coverage of each random half/half split."""
    n, k = probs.shape
    marginal, per_class = [], []
    for s in range(n_splits):
        perm = np.random.default_rng(1000 + s).permutation(n)
        cal, test = perm[: n // 2], perm[n // 2:]
        cp = ConformalPredictor(alpha=ALPHA, **kwargs).fit(probs[cal], labels[cal])
        hit = cp.predict_mask(probs[test])[np.arange(len(test)), labels[test]]
        marginal.append(hit.mean())
        per_class.append([hit[labels[test] == c].mean() for c in range(k)])
    return np.array(marginal), np.array(per_class)


MARGINAL_CASES = [
    pytest.param({"method": "lac"}, id="lac"),
    pytest.param({"method": "aps", "randomized": True}, id="aps-randomized"),
    pytest.param({"method": "raps", "randomized": True, "k_reg": 1, "lam": 0.01}, id="raps"),
]


@pytest.mark.parametrize("case", MARGINAL_CASES)
@pytest.mark.parametrize("model", ["well_calibrated", "over_confident"])
def test_marginal_coverage_over_random_splits(case, model, request):
    logits, labels = request.getfixturevalue(model)
    cov, _ = _split_coverages(softmax(logits), labels, **case)
    assert abs(cov.mean() - (1 - ALPHA)) <= 0.015
    assert cov.mean() >= 1 - ALPHA - 0.005  # never systematically below
    assert np.quantile(cov, 0.05) > 1 - ALPHA - 0.03


def test_deterministic_aps_is_valid(over_confident):
    logits, labels = over_confident
    cov, _ = _split_coverages(softmax(logits), labels, n_splits=50, method="aps")
    assert cov.mean() >= 1 - ALPHA - 0.005


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_mondrian_covers_every_class(method, over_confident):
    logits, labels = over_confident
    probs = softmax(logits)
    _, per_class = _split_coverages(probs, labels, n_splits=100, method=method,
                                    mondrian=True, randomized=True)
    assert per_class.mean(axis=0).min() >= 1 - ALPHA - 0.015
    cp = ConformalPredictor(method, ALPHA, mondrian=True).fit(probs, labels)
    assert np.shape(cp.qhat_) == (probs.shape[1],)


def test_quantile_is_the_exact_order_statistic():
    rng = np.random.default_rng(0)
    for n in [1, 5, 9, 10, 19, 99, 100, 999]:
        scores = rng.random(n)
        for alpha in [0.05, 0.1, 0.2, 0.5]:
            k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
            expected = np.sort(scores)[k - 1] if k <= n else math.inf
            assert conformal_quantile(scores, alpha) == expected, (n, alpha)
    # (n + 1)(1 - alpha) is an exact integer here: 1000 * 0.9 = 900, not 901
    assert conformal_quantile(np.arange(999.0), 0.1) == 899.0


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_k_beyond_n_gives_infinite_qhat_and_full_sets(method):
    probs = softmax(np.random.default_rng(0).normal(size=(8, 5)))
    labels = np.arange(8) % 5
    cp = ConformalPredictor(method, alpha=0.05).fit(probs, labels)  # k = ceil(9 * .95) = 9 > 8
    assert cp.qhat_ == math.inf
    d = json.loads(json.dumps(cp.to_dict()))
    assert d["qhat"] == "inf"
    assert all(len(s) == 5 for s in prediction_sets_from_dict(d, probs))
    mondrian = ConformalPredictor(method, 0.1, mondrian=True).fit(probs, labels)
    assert all(q == "inf" for q in mondrian.to_dict()["qhat"])  # <= 2 samples per class


def test_sets_mask_and_order_agree():
    probs = softmax(np.random.default_rng(3).normal(size=(50, 6)) * 2)
    labels = probs.argmax(axis=1)
    cp = ConformalPredictor("aps", 0.2, randomized=True).fit(probs, labels)
    mask = cp.predict_mask(probs)
    for row, s, m in zip(probs, cp.predict_sets(probs), mask, strict=True):
        assert sorted(s) == np.flatnonzero(m).tolist()
        assert list(row[s]) == sorted(row[s], reverse=True)  # most probable first


def test_randomised_sets_are_reproducible_and_batch_independent():
    probs = softmax(np.random.default_rng(4).normal(size=(400, 5)) * 2)
    labels = np.random.default_rng(5).integers(0, 5, 400)
    cp = ConformalPredictor("raps", 0.1, randomized=True, seed=3).fit(probs, labels)
    first = cp.predict_sets(probs)
    assert first == cp.predict_sets(probs)
    again = ConformalPredictor.from_dict(json.loads(json.dumps(cp.to_dict())))
    assert again.predict_sets(probs) == first
    order = np.random.default_rng(6).permutation(400)
    assert [first[i] for i in order[:37]] == cp.predict_sets(probs[order[:37]])
    other_seed = ConformalPredictor("raps", 0.1, randomized=True, seed=4).fit(probs, labels)
    assert other_seed.predict_sets(probs) != first


def test_round_trip_mondrian_json():
    probs = softmax(np.random.default_rng(1).normal(size=(600, 3)) * 2)
    labels = probs.argmax(axis=1)
    cp = ConformalPredictor("lac", 0.1, mondrian=True).fit(probs, labels)
    d = json.loads(json.dumps(cp.to_dict(), allow_nan=False))
    np.testing.assert_array_equal(ConformalPredictor.from_dict(d).qhat_, cp.qhat_)
    assert prediction_sets_from_dict(d, probs) == cp.predict_sets(probs)


def test_coverage_summary():
    s = coverage_summary([[0], [0, 1], [], [2]], [0, 1, 1, 0], n_classes=3)
    assert s == {"n_samples": 4, "coverage": 0.5, "mean_set_size": 1.0,
                 "singleton_rate": 0.5, "empty_rate": 0.25,
                 "per_class_coverage": [0.5, 0.5, None]}
    mask = np.array([[True, False, False], [True, True, False], [False] * 3, [False, False, True]])
    assert coverage_summary(mask, [0, 1, 1, 0], n_classes=3) == s


def test_errors():
    probs = softmax(np.zeros((4, 3)))
    with pytest.raises(ConfigError, match="--alpha"):
        ConformalPredictor(alpha=1.5).fit(probs, [0, 1, 2, 0])
    with pytest.raises(ConfigError, match="--conformal-method"):
        ConformalPredictor("thr").fit(probs, [0, 1, 2, 0])
    with pytest.raises(ConfigError, match="fit"):
        ConformalPredictor().predict_sets(probs)
    with pytest.raises(ConfigError, match="lack"):
        prediction_sets_from_dict({"method": "lac"}, probs)
    with pytest.raises(ConfigError, match="per-class"):
        prediction_sets_from_dict({"method": "lac", "alpha": 0.1, "mondrian": True,
                                   "qhat": [0.5, 0.5]}, probs)
    with pytest.raises(ConfigError, match="qhat"):
        prediction_sets_from_dict({"method": "lac", "alpha": 0.1, "qhat": "big"}, probs)
    with pytest.raises(ConfigError, match="version"):
        prediction_sets_from_dict({"method": "lac", "alpha": 0.1, "qhat": 0.5, "version": 9},
                                  probs)
