"""OOD scorers: the fused k-NN + relative Mahalanobis score, stored without pickle, its
threshold reproducible from what the bundle stores, and batch-independent scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load, save

from imgtriage.errors import ConfigError
from imgtriage.evaluate.ood import (
    KnnOOD,
    KnnRmdOOD,
    KnnRmdStagesOOD,
    auroc_fpr,
    knn_distance,
    scorer_from_rule,
    threshold_from_scores,
)


def _clusters(rng: np.random.Generator, n: int, classes: range, dim: int = 24
              ) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative features (like pooled ReLU activations): class c is strong in its own
    two dimensions, and every image shares a common background pattern."""
    y = rng.choice(list(classes), n)
    x = np.abs(rng.normal(0.3, 0.2, (n, dim))) + 1.0
    x[np.arange(n), 2 * y] += 3.0
    x[np.arange(n), 2 * y + 1] += 2.0
    return x, y


@pytest.fixture(scope="module")
def fitted() -> tuple[KnnRmdOOD, np.random.Generator]:
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 600, range(4))
    val, _ = _clusters(rng, 200, range(4))
    return KnnRmdOOD(k=5).fit(x, val, train_labels=y), rng


def test_stored_rule_and_arrays_rebuild_the_same_scores_and_threshold(fitted):
    ood, rng = fitted
    rule = json.loads(json.dumps(ood.rule()))  # the manifest is JSON
    arrays = load(save(ood.arrays()))  # ood.safetensors: arrays only, nothing executable
    again = scorer_from_rule(rule, arrays)
    assert isinstance(again, KnnRmdOOD) and rule["method"] == "knn+rmd"
    assert threshold_from_scores(arrays["val_scores"], rule["accept"]) == rule["threshold"]
    probe, _ = _clusters(rng, 50, range(4))
    np.testing.assert_allclose(again.score(probe), ood.score(probe), rtol=1e-6, atol=1e-6)


def test_unseen_class_and_noise_score_above_the_threshold(fitted):
    ood, rng = fitted
    seen, _ = _clusters(rng, 400, range(4))
    unseen, _ = _clusters(rng, 400, range(4, 8))  # new classes in the same feature space
    s_seen, s_unseen = ood.score(seen), ood.score(unseen)
    assert np.mean(s_seen <= ood.threshold_) >= 0.9  # accept = 0.95 on exchangeable data
    assert auroc_fpr(s_seen, s_unseen)["auroc"] > 0.95
    noise = np.abs(rng.normal(0, 5, (50, 24)))
    assert np.all(ood.score(noise) > ood.threshold_)


def test_fused_score_is_at_least_each_standardised_component(fitted):
    ood, rng = fitted
    x, _ = _clusters(rng, 30, range(6))
    c = ood.components(x)
    fused = ood.score(x)
    for name in ("knn", "rmd"):
        med, spread = ood.scale_[name]
        assert np.all(fused >= (c[name] - med) / spread - 1e-12)


def test_scores_do_not_depend_on_the_batch_they_come_in(fitted):
    ood, rng = fitted
    x, _ = _clusters(rng, 600, range(6))  # big enough to be split over threads
    one_by_one = np.concatenate([ood.score(x[i:i + 1]) for i in range(len(x))])
    # float32 products summed in another order (matrix vs vector kernels): 1e-4 at most
    np.testing.assert_allclose(ood.score(x), one_by_one, rtol=1e-4, atol=1e-3)


def test_knn_distance_is_the_kth_nearest_exactly():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = bank[:130] + 0.01 * rng.normal(size=(130, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.sort(np.linalg.norm(q[:, None, :] - bank[None], axis=2), axis=1)[:, 6]
    np.testing.assert_allclose(knn_distance(q, bank, 7), exact, atol=1e-4)


def test_plain_knn_bundles_still_load_and_broken_rules_say_how_to_fix():
    rng = np.random.default_rng(2)
    knn = KnnOOD(k=3).fit(rng.normal(size=(50, 4)), rng.normal(size=(20, 4)))
    assert type(scorer_from_rule(knn.rule(), knn.arrays())) is KnnOOD
    with pytest.raises(ConfigError, match="retrain"):
        scorer_from_rule({**knn.rule(), "method": "knn+rmd", "scale": {}}, knn.arrays())
    with pytest.raises(ConfigError, match="upgrade imgtriage or retrain"):
        scorer_from_rule({**knn.rule(), "method": "vim"}, knn.arrays())
    with pytest.raises(ConfigError, match="training labels"):
        KnnRmdOOD().fit(rng.normal(size=(50, 4)), rng.normal(size=(20, 4)))


def _with_stats(rng: np.random.Generator, x: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """``x`` then two stages' statistics (6 and 4 columns): correlated, as map statistics
    are, and moved by ``shift`` for an input of another kind."""
    base = rng.normal(0, 1, (len(x), 1))
    s1 = 1.0 + 0.3 * base + 0.1 * rng.normal(size=(len(x), 6)) + shift
    s2 = 2.0 - 0.2 * base + 0.1 * rng.normal(size=(len(x), 4)) + shift
    return np.concatenate([x, s1, s2], axis=1)


@pytest.fixture(scope="module")
def staged() -> tuple[KnnRmdStagesOOD, np.random.Generator]:
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, 600, range(4))
    val, _ = _clusters(rng, 200, range(4))
    return (KnnRmdStagesOOD(k=5, stage_widths=[6, 4]).fit(
        _with_stats(rng, x), _with_stats(rng, val), train_labels=y), rng)


def test_stage_statistics_refuse_another_kind_of_input_that_the_penultimate_part_accepts(
        staged):
    ood, rng = staged
    seen, _ = _clusters(rng, 400, range(4))
    usual, other_kind = _with_stats(rng, seen), _with_stats(rng, seen, shift=1.5)
    plain = KnnRmdOOD.from_rule({**ood.rule(), "method": "knn+rmd"}, ood.arrays())
    # the penultimate columns are the same: the plain score cannot tell the two apart
    assert auroc_fpr(plain.score(usual[:, :24]), plain.score(other_kind[:, :24]))["auroc"] < 0.6
    s_usual, s_other = ood.score(usual), ood.score(other_kind)
    assert auroc_fpr(s_usual, s_other)["auroc"] > 0.99
    assert np.mean(s_usual <= ood.threshold_) >= 0.9 and np.mean(s_other > ood.threshold_) > 0.95
    # the fused score is the largest of its parts: never below the penultimate score
    assert np.all(s_usual >= plain.score(usual[:, :24]) - 1e-9)


def test_stage_scorer_rebuilds_from_json_and_safetensors_and_checks_its_widths(staged):
    ood, rng = staged
    rule = json.loads(json.dumps(ood.rule()))
    assert rule["method"] == "knn+rmd+stages" and rule["stage_widths"] == [6, 4]
    assert rule["dim"] == 24 and {"stage0", "stage1", "knn", "rmd"} <= set(rule["scale"])
    again = scorer_from_rule(rule, load(save(ood.arrays())))
    probe = _with_stats(rng, _clusters(rng, 30, range(4))[0], shift=0.3)
    np.testing.assert_allclose(again.score(probe), ood.score(probe), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="34 columns"):
        ood.score(probe[:, :24])  # the penultimate part alone: the statistics are missing
    arrays = ood.arrays()
    del arrays["stage1_prec"]
    with pytest.raises(ConfigError, match="stage1_prec"):
        scorer_from_rule(rule, arrays)
    with pytest.raises(ConfigError, match="widths of the stage statistics"):
        KnnRmdStagesOOD().fit(probe, probe, train_labels=np.arange(30) % 3)
