"""DecisionPolicy round trips (with conformal) and agrees with the fitted pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgtriage.errors import ConfigError
from imgtriage.evaluate import ConformalPredictor, DecisionPolicy, fit_decision_policy, softmax


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
