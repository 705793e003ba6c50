"""Drift checks on seeded examples: same distribution passes, shifted ones are flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgtriage.errors import ConfigError
from imgtriage.evaluate import drift_check, reference_summary, softmax

NAMES = ["a", "b", "c", "d"]


def _outputs(rng, n, shift=0.0, abstain_rate=0.1):
    z = rng.normal(size=(n, 4)) * 2
    z[:, 0] += shift
    return softmax(z), rng.random(n) < abstain_rate


def test_same_distribution_is_not_flagged():
    rng = np.random.default_rng(0)
    ref_probs, ref_abs = _outputs(rng, 3000)
    ref = json.loads(json.dumps(reference_summary(ref_probs, ref_abs, class_names=NAMES)))
    cur_probs, cur_abs = _outputs(rng, 1000)
    out = drift_check(ref, cur_probs, class_names=NAMES, abstained=cur_abs, alpha=0.01)
    for key in ("max_score", "predicted_class", "abstain_rate"):
        assert out[key]["p_value"] > 0.01 and out[key]["shift"] is False, key
    assert out["shift"] is False
    json.dumps(out, allow_nan=False)


def test_shifts_are_flagged():
    rng = np.random.default_rng(1)
    ref_probs, ref_abs = _outputs(rng, 3000)
    ref = reference_summary(ref_probs, ref_abs, class_names=NAMES)
    cur_probs, cur_abs = _outputs(rng, 1000, shift=2.0, abstain_rate=0.25)
    out = drift_check(ref, cur_probs, class_names=NAMES, abstained=cur_abs)
    assert out["predicted_class"]["shift"] and out["max_score"]["shift"]
    assert out["abstain_rate"]["shift"] and out["abstain_rate"]["current_rate"] > 0.2
    assert out["shift"] is True


def test_unseen_class_and_missing_abstain_flags():
    rng = np.random.default_rng(2)
    ref_probs, _ = _outputs(rng, 500, shift=8.0)  # nearly everything predicted "a"
    ref = reference_summary(ref_probs)
    assert ref["abstain_count"] is None
    out = drift_check(ref, _outputs(rng, 500)[0], class_names=NAMES)
    assert np.isfinite(out["predicted_class"]["statistic"]) and out["predicted_class"]["shift"]
    assert out["abstain_rate"] is None


def test_reference_is_capped_and_checked():
    rng = np.random.default_rng(3)
    probs, abstained = _outputs(rng, 12000)
    ref = reference_summary(probs, abstained, class_names=NAMES)
    assert len(ref["max_scores"]) == 5000 and ref["n_samples"] == 12000
    assert sum(ref["class_counts"]) == 12000
    with pytest.raises(ConfigError, match="another model"):
        drift_check(ref, probs[:10], class_names=["w", "x", "y", "z"])
    with pytest.raises(ConfigError, match="classes"):
        drift_check(ref, softmax(np.zeros((3, 3))), class_names=NAMES[:3])
    with pytest.raises(ConfigError, match="one flag per row"):
        drift_check(ref, probs[:10], class_names=NAMES, abstained=[True])
    with pytest.raises(ConfigError, match="--drift-alpha"):
        drift_check(ref, probs[:10], class_names=NAMES, alpha=2)
