"""Threshold picking (checked against brute force) and parsing thresholds from the user."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imgtriage.errors import ConfigError
from imgtriage.evaluate import ThresholdPicker, parse_thresholds, to_probs


def _candidates(s: np.ndarray, pos: np.ndarray):
    """(threshold, precision, recall, tp, fp) for every distinct score, brute force."""
    out = []
    for t in np.unique(s):
        acc = s >= t
        tp, fp = int(np.sum(acc & pos)), int(np.sum(acc & ~pos))
        out.append((t, tp / (tp + fp), tp / pos.sum(), tp, fp))
    return out


def _random(seed, n=300, k=4):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 1.5
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += 1.2
    return to_probs(z), y


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_target_precision_is_met_with_highest_recall(seed, target):
    p, y = _random(seed)
    picker = ThresholdPicker("target_precision", target=target).fit(p, y)
    for k, t in enumerate(picker.thresholds_):
        s, pos = p[:, k], y == k
        feasible = [c for c in _candidates(s, pos) if c[1] >= target]
        got = picker.achieved_[k]
        if not feasible:
            assert t == 1.0 and got["met"] is False and "precision" in got["note"]
            continue
        assert got["met"] is True
        acc = s >= t
        precision = np.sum(acc & pos) / acc.sum()
        assert precision >= target  # met on the split it was chosen on
        assert got["precision"] == pytest.approx(precision)
        assert got["recall"] == pytest.approx(max(c[2] for c in feasible))


def test_target_precision_scans_non_monotone_precision():
    # descending scores with labels; precision by threshold:
    # .95:1/1  .90:1/2  .85:1/3  .80:2/4  .75:3/5  .70:4/6  .60:4/7  .50:5/8  .40:5/9  .30:5/10
    scores = np.array([0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.60, 0.50, 0.40, 0.30])
    labels = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 0])
    probs = np.c_[1 - scores, scores]
    picker = ThresholdPicker("target_precision", target=0.65, positive_class=1).fit(probs, labels)
    # walking down from the top stops at .95 (recall .2); the best feasible is .70 (recall .8)
    assert picker.thresholds_[1] == pytest.approx(0.70)
    assert picker.achieved_[1]["recall"] == pytest.approx(0.8)
    assert picker.achieved_[1]["precision"] == pytest.approx(4 / 6)
    assert picker.thresholds_[0] == 0.0  # not fitted: always accepted
    picker = ThresholdPicker("target_precision", target=0.6, positive_class=1).fit(probs, labels)
    assert picker.thresholds_[1] == pytest.approx(0.50)  # precision .625, recall 1.0


def test_unreachable_precision_is_flagged_not_faked():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([0, 1, 0, 1])  # best precision anywhere is 0.5
    picker = ThresholdPicker("target_precision", target=0.9).fit(np.c_[1 - scores, scores],
                                                                 labels)
    assert picker.thresholds_[1] == 1.0
    assert picker.achieved_[1]["met"] is False
    assert picker.achieved_[1]["tp"] == 0  # what 1.0 really achieves


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.5, 0.9, 1.0])
def test_target_recall_is_met_at_highest_threshold(seed, target):
    p, y = _random(seed)
    picker = ThresholdPicker("target_recall", target=target).fit(p, y)
    for k, t in enumerate(picker.thresholds_):
        s, pos = p[:, k], y == k
        assert np.sum((s >= t) & pos) / pos.sum() >= target
        best = max(c[0] for c in _candidates(s, pos) if c[2] >= target)
        assert t == pytest.approx(best)


@pytest.mark.parametrize("seed", range(3))
def test_max_f1_matches_brute_force(seed):
    p, y = _random(seed)
    picker = ThresholdPicker("max_f1").fit(p, y)
    for k in range(p.shape[1]):
        f1s = [2 * c[3] / (2 * c[3] + c[4] + (np.sum(y == k) - c[3]))
               for c in _candidates(p[:, k], y == k)]
        assert picker.achieved_[k]["f1"] == pytest.approx(max(f1s))


@pytest.mark.parametrize(("cost_fn", "cost_fp"), [(1.0, 1.0), (10.0, 1.0), (1.0, 10.0)])
def test_cost_minimises_weighted_errors(cost_fn, cost_fp):
    rng = np.random.default_rng(0)
    s = rng.random(300)
    y = (rng.random(300) < s).astype(int)
    picker = ThresholdPicker("cost", cost_fn=cost_fn, cost_fp=cost_fp).fit(np.c_[1 - s, s], y)
    pos = y == 1
    costs = [cost_fn * np.sum(~(s >= t) & pos) + cost_fp * np.sum((s >= t) & ~pos)
             for t in [*np.unique(s), np.inf]]
    t = picker.thresholds_[1]
    got = cost_fn * np.sum((s < t) & pos) + cost_fp * np.sum((s >= t) & ~pos)
    assert got == pytest.approx(min(costs))
    assert picker.achieved_[1]["cost"] == pytest.approx(min(costs))
    assert picker.thresholds_[0] == 0.0
    if cost_fn > cost_fp:
        assert t < ThresholdPicker("cost").fit(np.c_[1 - s, s], y).thresholds_[1]


def test_parameter_errors():
    p, y = _random(0)
    with pytest.raises(ConfigError, match="binary"):
        ThresholdPicker("cost").fit(p, y)
    with pytest.raises(ConfigError, match="--target"):
        ThresholdPicker("target_precision").fit(p, y)
    with pytest.raises(ConfigError, match="--threshold-strategy"):
        ThresholdPicker("best").fit(p, y)
    with pytest.raises(ConfigError, match="--positive-class"):
        ThresholdPicker("max_f1", positive_class=9).fit(p, y)


def test_absent_class_gets_one_and_a_note():
    p, y = _random(0, k=3)
    y[y == 2] = 0
    picker = ThresholdPicker("target_recall", target=0.9).fit(p, y)
    assert picker.thresholds_[2] == 1.0 and picker.achieved_[2]["met"] is False
    json.dumps(picker.to_dict())


NAMES = ["cat", "dog", "owl"]


def test_parse_thresholds_all_forms(tmp_path):
    assert parse_thresholds(0.5, NAMES) == (0.5, 0.5, 0.5)
    assert parse_thresholds("0.25", NAMES) == (0.25, 0.25, 0.25)
    assert parse_thresholds([0.1, 0.2, 0.3], NAMES) == (0.1, 0.2, 0.3)
    assert parse_thresholds("[0.1, 0.2, 0.3]", NAMES) == (0.1, 0.2, 0.3)
    assert parse_thresholds('{"owl": 0.3, "cat": 0.1, "dog": 0.2}', NAMES) == (0.1, 0.2, 0.3)
    assert parse_thresholds({"owl": 1, "cat": 0, "dog": 0.5}, NAMES) == (0.0, 0.5, 1.0)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"dog": 0.2, "cat": 0.1, "owl": 0.3}))
    assert parse_thresholds(str(f), NAMES) == (0.1, 0.2, 0.3)
    assert parse_thresholds(f, NAMES) == (0.1, 0.2, 0.3)
    f.write_text(json.dumps({"thresholds": [0.4, 0.5, 0.6]}))
    assert parse_thresholds(str(f), NAMES) == (0.4, 0.5, 0.6)


def test_parse_thresholds_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing classes \['owl'\]") as exc:
        parse_thresholds('{"cat": 0.1, "dog": 0.2}', NAMES)
    assert "--thresholds" in str(exc.value)
    with pytest.raises(ConfigError, match=r"unknown classes \['cow'\]"):
        parse_thresholds({"cat": 0.1, "dog": 0.2, "owl": 0.3, "cow": 0.4}, NAMES)
    with pytest.raises(ConfigError, match="2 thresholds for 3 classes"):
        parse_thresholds("[0.1, 0.2]", NAMES)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        parse_thresholds(1.5, NAMES)
    with pytest.raises(ConfigError, match="must be a number"):
        parse_thresholds(["a", 0.2, 0.3], NAMES)
    with pytest.raises(ConfigError, match="not a number"):
        parse_thresholds(str(tmp_path / "missing.json"), NAMES)
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_thresholds("[0.1, ", NAMES)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read thresholds"):
        parse_thresholds(str(bad), NAMES)
    with pytest.raises(ConfigError):
        parse_thresholds(True, NAMES)


def test_recall_target_with_delta_holds_on_new_data_in_95_percent_of_200_draws():
    """Positive-class scores ~ Beta(5, 2): the recall of a threshold t on new data is exactly
    1 - F(t). A target of 0.95 at delta 0.05 must hold in >= 95% of validation draws, where
    the plain empirical threshold misses it about half the time."""
    from scipy.stats import beta

    rng = np.random.default_rng(0)
    held, held_plain = 0, 0
    for _ in range(200):
        pos = rng.beta(5, 2, size=120)
        neg = rng.beta(2, 5, size=120)
        probs1 = np.r_[pos, neg]
        probs = np.c_[1 - probs1, probs1]
        y = np.r_[np.ones(120, int), np.zeros(120, int)]
        t = ThresholdPicker("target_recall", target=0.95, positive_class=1,
                            delta=0.05).fit(probs, y)
        plain = ThresholdPicker("target_recall", target=0.95, positive_class=1).fit(probs, y)
        held += beta.sf(t.thresholds_[1], 5, 2) >= 0.95
        held_plain += beta.sf(plain.thresholds_[1], 5, 2) >= 0.95
        assert t.achieved_[1]["rests_on_positives"] == 120
    assert held >= 190
    assert held_plain < 150  # the bound is what makes the difference


def test_recall_target_with_too_few_positives_says_so():
    probs = np.array([[0.2, 0.8]] * 10 + [[0.9, 0.1]] * 10)
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    t = ThresholdPicker("target_recall", target=0.95, positive_class=1, delta=0.05).fit(probs, y)
    a = t.achieved_[1]
    assert a["met"] is False and a["min_positives"] == 59 and a["rests_on_positives"] == 10
    assert t.thresholds_[1] == 0.0 and "only 10 validation positives" in a["note"]


def test_precision_target_with_delta_is_stricter_than_without():
    rng = np.random.default_rng(1)
    p1 = np.r_[rng.beta(5, 2, 300), rng.beta(2, 5, 300)]
    probs, y = np.c_[1 - p1, p1], np.r_[np.ones(300, int), np.zeros(300, int)]
    plain = ThresholdPicker("target_precision", target=0.9, positive_class=1).fit(probs, y)
    bound = ThresholdPicker("target_precision", target=0.9, positive_class=1,
                            delta=0.05).fit(probs, y)
    assert bound.thresholds_[1] > plain.thresholds_[1]
    assert bound.achieved_[1]["precision"] >= 0.9
