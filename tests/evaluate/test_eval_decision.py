"""DecisionPolicy round trips (with conformal) and agrees with the fitted pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgtriage.errors import ConfigError
from imgtriage.evaluate import ConformalPredictor, DecisionPolicy, fit_decision_policy, softmax
from imgtriage.evaluate.metrics import negative_log_likelihood


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
@pytest.mark.parametrize("mondrian", [False, True])
def test_round_trip_and_sets_equal_predictor(method, mondrian):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 4)) * 3
    labels = (logits + rng.normal(size=logits.shape) * 2).argmax(axis=1)
    temperature = 1.8
    cp = ConformalPredictor(method, 0.1, mondrian=mondrian, randomized=True).fit(
        softmax(logits, temperature), labels)
    policy = DecisionPolicy(temperature=temperature, thresholds=(0.4, 0.5, 0.6, 0.7),
                            abstain=True, conformal=cp.to_dict(), profile="review")
    text = json.dumps(policy.to_dict(), allow_nan=False)
    again = DecisionPolicy.from_dict(json.loads(text))
    assert again == policy
    assert again.to_dict() == policy.to_dict()
    new = rng.normal(size=(100, 4)) * 3
    decided = again.decide(new)
    assert decided.sets == cp.predict_sets(softmax(new, temperature))
    np.testing.assert_allclose(decided.probs, softmax(new, temperature))


def test_bad_conformal_block_fails_on_load():
    with pytest.raises(ConfigError, match="conformal"):
        DecisionPolicy.from_dict({"temperature": 1.0, "conformal": {"method": "lac"}})
    assert DecisionPolicy.from_dict(None) == DecisionPolicy()


def test_fit_decision_policy_end_to_end(over_confident):
    logits, labels = over_confident
    policy, summary = fit_decision_policy(
        logits[:1500], labels[:1500], class_names=[f"c{i}" for i in range(10)],
        threshold_strategy="target_precision", target=0.8, abstain=True,
        conformal_method="aps", alpha=0.1)
    assert 2.5 < policy.temperature < 3.5
    assert policy.thresholds is not None and len(policy.thresholds) == 10
    json.dumps(summary, allow_nan=False)
    assert summary["conformal"]["coverage"] >= 0.9
    decided = policy.decide(logits[1500:])
    hit = [y in s for s, y in zip(decided.sets, labels[1500:], strict=True)]
    assert np.mean(hit) > 0.87
    assert DecisionPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    with pytest.raises(ConfigError, match="not both"):
        fit_decision_policy(logits, labels, class_names=[f"c{i}" for i in range(10)],
                            threshold_strategy="max_f1", thresholds=0.5)


def test_positive_class_threshold_decides_recall_first():
    # p(unsafe) = 0.3 < p(safe) = 0.7, but the recall-first threshold for unsafe is 0.2.
    logits = np.log(np.array([[0.7, 0.3], [0.9, 0.1], [0.4, 0.6]]))
    rule = DecisionPolicy(thresholds=(0.0, 0.2), positive_class=1)
    d = rule.decide(logits)
    assert d.class_id.tolist() == [1, 0, 1]
    assert np.allclose(d.score, [0.3, 0.9, 0.6])
    plain = DecisionPolicy(thresholds=(0.0, 0.2)).decide(logits)
    assert plain.class_id.tolist() == [0, 0, 1]  # without a positive class, argmax stands
    back = DecisionPolicy.from_dict(rule.to_dict())
    assert back == rule


def test_positive_class_needs_thresholds():
    with pytest.raises(ConfigError, match="--positive-class"):
        DecisionPolicy(positive_class=1)


def _imbalanced_posteriors(n: int = 4000, minority: float = 0.1, seed: int = 0):
    """Log posteriors of the Bayes model of two overlapping 1-D Gaussians with a 9:1 prior
    (what a well-fitted network trained on that prior outputs), and the labels."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < minority).astype(int)
    x = rng.normal(size=n) + 1.5 * y
    prior = np.array([1 - minority, minority])
    loglik = np.stack([-0.5 * x ** 2, -0.5 * (x - 1.5) ** 2], axis=1)
    return loglik + np.log(prior), y, prior


def _recalls(class_id: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.array([np.mean(class_id[y == k] == k) for k in range(2)])


def test_prior_correction_moves_the_decision_to_equal_priors():
    logits, y, prior = _imbalanced_posteriors()
    plain = DecisionPolicy().decide(logits)
    fixed = DecisionPolicy(prior_correction=tuple(-np.log(prior))).decide(logits)
    r_plain, r_fixed = _recalls(plain.class_id, y), _recalls(fixed.class_id, y)
    # the plain argmax all but ignores the minority; the corrected one is the balanced
    # (likelihood-ratio) decision: far higher minority recall and balanced accuracy
    assert r_fixed[1] > r_plain[1] + 0.3
    assert r_fixed.mean() > r_plain.mean() + 0.1
    # the correction is the Bayes rule for equal priors: no shift of it does better
    for shift in (-0.5, 0.5):
        other = DecisionPolicy(prior_correction=(float(-np.log(prior[0])),
                                                 float(-np.log(prior[1]) + shift)))
        assert _recalls(other.decide(logits).class_id, y).mean() <= r_fixed.mean() + 0.01
    # the rule decides with the probabilities of equal priors, and reports those of the data
    np.testing.assert_allclose(fixed.decision_probs, softmax(logits - np.log(prior)))
    assert np.array_equal(fixed.class_id, fixed.decision_probs.argmax(1))
    np.testing.assert_array_equal(fixed.probs, softmax(logits))


@pytest.mark.parametrize("seed", range(6))
def test_a_correction_reports_plain_probabilities_and_decides_at_equal_priors(seed):
    """(a) reported = softmax(logits / T) exactly, whatever the offsets; (b) the label is the
    argmax of the equal-prior scores, and thresholds, positive class and sets read those."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    logits = rng.normal(size=(300, k)) * rng.uniform(0.5, 5)
    offsets = tuple(float(v) for v in rng.normal(size=k) * 2)
    t = float(rng.uniform(0.3, 3))
    thresholds = tuple(float(v) for v in rng.uniform(0.2, 0.8, size=k))
    labels = (logits + rng.normal(size=logits.shape)).argmax(1)
    balanced = softmax(logits, t, offsets)
    cp = ConformalPredictor("aps", 0.2, randomized=False).fit(balanced, labels)
    for positive in (None, int(rng.integers(k))):
        policy = DecisionPolicy(temperature=t, prior_correction=offsets, thresholds=thresholds,
                                abstain=True, positive_class=positive, conformal=cp.to_dict())
        d = DecisionPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))).decide(logits)
        np.testing.assert_array_equal(d.probs, softmax(logits, t))  # (a), bit for bit
        np.testing.assert_array_equal(d.probs, policy.probabilities(logits))
        np.testing.assert_array_equal(d.decision_probs, balanced)
        rows = np.arange(len(logits))
        np.testing.assert_array_equal(d.score, d.probs[rows, d.class_id])
        # (b) what the rule did before the two were told apart: every part reads the
        # equal-prior scores (so a bundle from then decides exactly as it did)
        want = balanced.argmax(1)
        hit = np.zeros(len(logits), bool)
        if positive is not None:
            hit = balanced[:, positive] >= thresholds[positive]
            want = np.where(hit, positive, want)
        np.testing.assert_array_equal(d.class_id, want)
        low = (balanced[rows, want] < np.asarray(thresholds)[want]) & ~hit
        np.testing.assert_array_equal(d.abstained, low)
        assert d.sets == cp.predict_sets(balanced)
    plain = DecisionPolicy(temperature=t).decide(logits)
    np.testing.assert_array_equal(plain.probs, plain.decision_probs)  # no correction: one set
    assert "equal class priors" in policy.describe_priors()
    assert "equal" not in DecisionPolicy().describe_priors()


def _ece(probs: np.ndarray, y: np.ndarray) -> float:
    """Class-wise ECE: is each class's probability what it says? (Top-label ECE barely sees a
    prior shift in two classes: the over-confident minority answers and the under-confident
    majority ones fall in the same bins and cancel.)"""
    from imgtriage.evaluate.metrics import classwise_ece

    return classwise_ece(probs, y)["mean"]


def test_reported_probabilities_are_calibrated_at_the_data_prior():
    """(d) a model whose logits are the data prior's posteriors: the fitted policy reports
    probabilities with a lower ECE than the equal-prior ones it reported before, and its
    labels (hence balanced accuracy) are those of equal priors, unchanged."""
    logits, y, prior = _imbalanced_posteriors(8000, seed=3)
    offsets = tuple(float(v) for v in -np.log(prior))
    val, test = slice(0, 4000), slice(4000, None)
    policy, summary = fit_decision_policy(logits[val], y[val], class_names=["a", "b"],
                                          prior_correction=offsets)
    assert 0.9 < policy.temperature < 1.1  # fitted on the plain logits: already calibrated
    d = policy.decide(logits[test])
    before = softmax(logits[test], policy.temperature, offsets)  # what it reported until now
    assert _ece(d.probs, y[test]) < 0.03 < _ece(before, y[test]) - 0.15
    assert negative_log_likelihood(d.probs, y[test]) < negative_log_likelihood(
        before, y[test]) - 0.1
    np.testing.assert_array_equal(d.class_id, before.argmax(1))
    recall = _recalls(d.class_id, y[test])
    assert recall.mean() > _recalls(d.probs.argmax(1), y[test]).mean() + 0.1
    # the drift reference holds what the rows report, the numbers a drift check reads
    ref = summary["drift_reference"]
    assert ref["class_counts"] == np.bincount(policy.probabilities(logits[val]).argmax(1),
                                              minlength=2).tolist()


def test_prior_correction_round_trips_and_refuses_bad_values():
    policy = DecisionPolicy(temperature=1.5, prior_correction=[0.4, -0.4])
    again = DecisionPolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy and again.prior_correction == (0.4, -0.4)
    assert DecisionPolicy.from_dict({"temperature": 1.0}).prior_correction is None  # old bundles
    for bad in ([float("nan"), 0.0], [1e3, 0.0], []):
        with pytest.raises(ConfigError, match="prior correction"):
            DecisionPolicy(prior_correction=bad)
    with pytest.raises(ConfigError, match="2 prior-correction offsets for 3 classes"):
        policy.decide(np.zeros((1, 3)))


def test_fitted_policy_keeps_the_correction_and_thresholds_its_probabilities():
    logits, y, prior = _imbalanced_posteriors(2000, seed=1)
    offsets = tuple(float(v) for v in -np.log(prior))
    policy, _ = fit_decision_policy(logits, y, class_names=["a", "b"], target_accuracy=0.9,
                                    prior_correction=offsets)
    assert policy.prior_correction == offsets
    d = policy.decide(logits)
    np.testing.assert_allclose(d.decision_probs, softmax(logits, policy.temperature, offsets))
    answered = ~d.abstained  # the confidence threshold was fitted on these scores
    assert np.mean(d.class_id[answered] == y[answered]) >= 0.9
    with pytest.raises(ConfigError, match="1 prior-correction offsets for 2 classes"):
        fit_decision_policy(logits, y, class_names=["a", "b"], prior_correction=[0.0])
