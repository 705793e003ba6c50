"""Metrics: hand-computed ECE, agreement with scikit-learn, invariance to class order/names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from imgtriage.errors import ConfigError, DataError
from imgtriage.evaluate import (
    accuracy,
    balanced_accuracy,
    brier_score,
    classification_report,
    classwise_ece,
    confusion_matrix,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    risk_coverage,
    to_probs,
    top_k_accuracy,
)

# six samples, three classes; confidences chosen away from the 1/15 bin edges
HAND_PROBS = np.array([
    [0.95, 0.03, 0.02],  # label 0, conf .95, correct   -> bin 14 (14/15, 1]
    [0.90, 0.05, 0.05],  # label 1, conf .90, wrong     -> bin 13 (13/15, 14/15]
    [0.10, 0.85, 0.05],  # label 1, conf .85, correct   -> bin 12 (12/15, 13/15]
    [0.20, 0.70, 0.10],  # label 2, conf .70, wrong     -> bin 10 (10/15, 11/15]
    [0.31, 0.27, 0.42],  # label 2, conf .42, correct   -> bin 6  (6/15, 7/15]
    [0.72, 0.18, 0.10],  # label 0, conf .72, correct   -> bin 10
])
HAND_LABELS = np.array([0, 1, 1, 2, 2, 0])


def test_ece_hand_computed_equal_width():
    # bin 14: |1 - .95| = .05; bin 13: |0 - .90| = .90; bin 12: |1 - .85| = .15
    # bin 10: acc (0 + 1)/2 = .5, conf (.70 + .72)/2 = .71 -> .21, two samples
    # bin 6:  |1 - .42| = .58
    expected = (0.05 + 0.90 + 0.15 + 2 * 0.21 + 0.58) / 6  # = 0.35
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS) == pytest.approx(expected)
    assert expected == pytest.approx(0.35)
    bins = reliability_bins(HAND_PROBS, HAND_LABELS)
    assert bins["count"].tolist() == [0] * 6 + [1, 0, 0, 0, 2, 0, 1, 1, 1]


def test_ece_hand_computed_adaptive():
    # sorted by confidence: .42 .70 | .72 .85 | .90 .95  (3 bins of 2)
    # acc .5 conf .56 -> .06 ; acc 1 conf .785 -> .215 ; acc .5 conf .925 -> .425
    expected = (0.06 + 0.215 + 0.425) / 3
    got = expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=3, mode="adaptive")
    assert got == pytest.approx(expected)


def test_ece_zero_for_perfect_one_hot_and_mode_check():
    onehot = np.eye(4)[[0, 1, 2, 3, 1]]
    assert expected_calibration_error(onehot, [0, 1, 2, 3, 1]) == 0.0
    assert classwise_ece(onehot, [0, 1, 2, 3, 1])["mean"] == 0.0
    with pytest.raises(ConfigError, match="--ece-mode"):
        expected_calibration_error(onehot, [0, 1, 2, 3, 1], mode="quantile")


def _random(seed=0, n=400, k=5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 2
    y = rng.integers(0, k, n)
    z[np.arange(n), y] += 1.0
    return to_probs(z), y


@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_sklearn(seed):
    p, y = _random(seed)
    pred = p.argmax(axis=1)
    k = p.shape[1]
    assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, pred))
    assert balanced_accuracy(p, y) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert top_k_accuracy(p, y, 2) == pytest.approx(
        skm.top_k_accuracy_score(y, p, k=2, labels=range(k)))
    assert negative_log_likelihood(p, y) == pytest.approx(skm.log_loss(y, p, labels=range(k)))
    np.testing.assert_array_equal(confusion_matrix(y, pred, k),
                                  skm.confusion_matrix(y, pred, labels=range(k)))
    onehot = np.eye(k)[y]
    assert brier_score(p, y) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    r = classification_report(p, y, [f"c{i}" for i in range(k)], from_logits=False)
    f1 = skm.f1_score(y, pred, average=None, labels=range(k))
    np.testing.assert_allclose([c["f1"] for c in r["per_class"]], f1)
    assert r["macro_avg"]["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert r["weighted_avg"]["f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert r["macro_avg"]["precision"] == pytest.approx(
        skm.precision_score(y, pred, average="macro", zero_division=0))
    for c in range(k):
        assert r["per_class"][c]["roc_auc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        assert r["per_class"][c]["average_precision"] == pytest.approx(
            skm.average_precision_score(y == c, p[:, c]))
    assert r["macro_roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_probabilities_sum_to_one_even_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [3.0, 3.0, 3.0], [-800.0, -801.0, -900.0]])
    p = to_probs(z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert np.all(np.isfinite(p))


def test_survives_class_permutation_and_renaming():
    p, y = _random(5)
    names = ["ant", "bee", "cat", "dog", "eel"]
    base = classification_report(p, y, names, from_logits=False)
    perm = np.array([3, 0, 4, 1, 2])  # new column j is old class perm[j]
    inv = np.argsort(perm)
    renamed = [f"X{n}" for n in names]
    other = classification_report(p[:, perm], inv[y], [renamed[j] for j in perm],
                                  from_logits=False)
    for key in ("accuracy", "balanced_accuracy", "nll", "brier", "ece", "adaptive_ece",
                "classwise_ece", "macro_roc_auc", "mean_average_precision"):
        assert other[key] == pytest.approx(base[key]), key
    assert other["macro_avg"] == pytest.approx(base["macro_avg"])
    assert other["risk_coverage"]["aurc"] == pytest.approx(base["risk_coverage"]["aurc"])
    for j, old in enumerate(perm):
        a, b = other["per_class"][j], base["per_class"][old]
        assert a["class"] == "X" + b["class"]
        for key in ("precision", "recall", "f1", "support", "roc_auc", "average_precision"):
            assert a[key] == pytest.approx(b[key])
    cm_new = np.array(other["confusion_matrix"]["counts"])
    cm_old = np.array(base["confusion_matrix"]["counts"])
    np.testing.assert_array_equal(cm_new, cm_old[np.ix_(perm, perm)])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_gives_null_auc_and_valid_json():
    p, y = _random(1, k=4)
    y[y == 3] = 0  # class 3 never occurs in the labels
    r = classification_report(p, y, list("abcd"), from_logits=False)
    assert r["per_class"][3]["roc_auc"] is None
    assert r["per_class"][3]["average_precision"] is None
    assert r["per_class"][3]["support"] == 0
    assert r["curves"]["pr"][3]["precision"] is None
    json.loads(json.dumps(r, allow_nan=False))
    assert r["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, p.argmax(axis=1)))


def test_report_contents_and_curve_sizes():
    p, y = _random(2, n=3000, k=3)
    r = classification_report(np.log(p), y, ["a", "b", "c"], topk=(1, 2, 5))
    assert set(r["top_k_accuracy"]) == {"1", "2"}  # k = 5 exceeds the number of classes
    for curve in r["curves"]["pr"] + r["curves"]["roc"]:
        assert len(curve.get("precision") or curve.get("fpr")) <= 200
    assert len(r["risk_coverage"]["coverage"]) <= 200
    norm = np.array(r["confusion_matrix"]["normalized"])
    np.testing.assert_allclose(norm.sum(axis=1), 1.0)
    assert r["accuracy"] == pytest.approx(accuracy(p, y))


def test_risk_coverage_matches_brute_force():
    p, y = _random(3, n=300)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order = np.argsort(-conf)
    risks = [np.mean(~correct[order[:i]]) for i in range(1, len(y) + 1)]
    rc = risk_coverage(p, y)
    assert rc["aurc"] == pytest.approx(np.mean(risks))
    assert rc["eaurc"] >= 0
    assert rc["coverage"][-1] == pytest.approx(1.0)
    assert rc["risk"][-1] == pytest.approx(1 - correct.mean())


def test_risk_coverage_ties_do_not_depend_on_row_order():
    p, y = _random(4, n=200, k=2)
    p = np.round(p, 1)  # many tied confidences
    p = p / p.sum(axis=1, keepdims=True)
    perm = np.random.default_rng(0).permutation(len(y))
    assert risk_coverage(p, y)["aurc"] == pytest.approx(risk_coverage(p[perm], y[perm])["aurc"])


def test_input_errors():
    with pytest.raises(DataError, match="labels"):
        accuracy(np.eye(2), [0, 1, 2])
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        accuracy(np.eye(2), [0, 2])
    with pytest.raises(DataError, match="sum to 1"):
        accuracy([[0.9, 0.9]], [0])
    with pytest.raises(DataError, match="class names"):
        classification_report(np.eye(2), [0, 1], ["a"], from_logits=False)
