"""Abstain summary against a plain Python loop."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.errors import ConfigError
from imgtriage.evaluate import DecisionPolicy, abstain_mask, abstain_summary, to_probs


def _brute(probs, labels, thresholds):
    kept = correct_kept = 0
    per_class_n = [0] * probs.shape[1]
    per_class_abs = [0] * probs.shape[1]
    for row, label in zip(probs.tolist(), labels.tolist(), strict=True):
        top = max(range(len(row)), key=lambda j: row[j])
        per_class_n[label] += 1
        if row[top] >= thresholds[top]:
            kept += 1
            correct_kept += top == label
        else:
            per_class_abs[label] += 1
    rates = [a / n if n else None for a, n in zip(per_class_abs, per_class_n, strict=True)]
    return kept / len(labels), (correct_kept / kept if kept else None), len(labels) - kept, rates


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    probs = to_probs(rng.normal(size=(250, k)) * 2)
    labels = rng.integers(0, k, 250)
    thresholds = rng.uniform(0.2, 0.9, k).tolist()
    s = abstain_summary(probs, labels, thresholds)
    coverage, acc, n_abs, rates = _brute(probs, labels, thresholds)
    assert s["coverage"] == pytest.approx(coverage)
    assert s["accuracy_at_coverage"] == pytest.approx(acc)
    assert s["abstain_count"] == n_abs
    assert [c["abstain_rate"] for c in s["per_class"]] == pytest.approx(rates)
    assert sum(c["predicted_abstain_count"] for c in s["per_class"]) == n_abs


def test_same_rule_as_decision_policy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 3)) * 2
    policy = DecisionPolicy(temperature=1.7, thresholds=(0.5, 0.6, 0.7), abstain=True)
    decided = policy.decide(logits)
    np.testing.assert_array_equal(abstain_mask(decided.probs, policy.thresholds),
                                  decided.abstained)


def test_edge_cases():
    probs = np.array([[0.6, 0.4], [0.3, 0.7]])
    everything = abstain_summary(probs, [0, 1], 1.0)
    assert everything["coverage"] == 0.0 and everything["accuracy_at_coverage"] is None
    nothing = abstain_summary(probs, [0, 0], None, class_names=["a", "b"])
    assert nothing["coverage"] == 1.0 and nothing["accuracy_at_coverage"] == 0.5
    assert nothing["per_class"][1]["abstain_rate"] is None  # no sample of class b
    assert nothing["per_class"][0]["class"] == "a"
    with pytest.raises(ConfigError, match="--thresholds"):
        abstain_summary(probs, [0, 1], [0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="--thresholds"):
        abstain_summary(probs, [0, 1], [0.5, 1.5])
