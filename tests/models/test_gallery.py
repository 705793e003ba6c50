"""Few-shot galleries, the math: vectorised scoring, enrol/remove exactness, config errors.
(Gallery bundles, their predictor and edits: tests/predict/test_gallery_kind.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.errors import ConfigError, DataError
from imgtriage.models.gallery import Gallery, GalleryConfig


# -- the data structure -----------------------------------------------------------------------
def _random_gallery(seed: int = 0, n: int = 40, d: int = 8, k: int = 4) -> Gallery:
    rng = np.random.default_rng(seed)
    labels = [f"c{i % k}" for i in range(n)]
    return Gallery.build(rng.normal(size=(n, d)), labels, [f"item{i}" for i in range(n)])


def _naive_knn(g: Gallery, q: np.ndarray, k: int) -> np.ndarray:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = np.zeros((len(q), len(g.classes)))
    for i in range(len(q)):
        for j, c in enumerate(g.classes):
            sims = sorted((float(qn[i] @ e) for e, lab in zip(g.embeddings, g.labels,
                                                              strict=True) if lab == c),
                          reverse=True)
            out[i, j] = np.mean(sims[:k])
    return out


@pytest.mark.parametrize("k", [1, 3, 100])
def test_knn_scoring_matches_a_per_item_loop(k):
    g = _random_gallery()
    q = np.random.default_rng(1).normal(size=(7, 8)).astype(np.float32)
    np.testing.assert_allclose(g.similarities(q, "knn", k), _naive_knn(g, q, k), atol=1e-5)


def test_prototype_scoring_is_cosine_to_class_means():
    g = _random_gallery()
    q = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
    means = np.stack([g.embeddings[[lab == c for lab in g.labels]].mean(0) for c in g.classes])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(g.similarities(q), qn @ means.T, atol=1e-5)
    assert np.allclose(np.linalg.norm(g.embeddings, axis=1), 1.0)


def test_add_then_remove_is_exact_and_leaves_other_classes_alone():
    g = _random_gallery()
    q = np.random.default_rng(3).normal(size=(9, 8)).astype(np.float32)
    before = g.similarities(q)
    grown = g.add("new", np.random.default_rng(4).normal(size=(3, 8)), ["a", "b", "c"])
    assert grown.classes == (*g.classes, "new") and grown.counts()["new"] == 3
    assert np.array_equal(grown.prototypes[:4], g.prototypes)
    np.testing.assert_allclose(grown.similarities(q)[:, :4], before, rtol=0, atol=1e-6)
    back = grown.remove("new")
    assert np.array_equal(back.similarities(q), before)
    assert back.ids == g.ids and back.labels == g.labels


def test_remove_items_by_file_name_and_errors():
    g = Gallery.build(np.eye(4), ["a", "a", "b", "b"], ["x/1.png", "x/2.png", "y/3.png", "y/4"])
    assert g.remove("a", ["2.png"]).counts() == {"a": 1, "b": 2}
    assert g.remove("a", ["x/1.png", "x/2.png"]).classes == ("b",)
    with pytest.raises(DataError, match="holds no items"):
        g.remove("a", ["3.png"])
    with pytest.raises(DataError, match="not in the gallery"):
        g.remove("zzz")
    with pytest.raises(DataError, match="at least one class"):
        g.remove("a").remove("b")
    with pytest.raises(DataError, match="already holds"):
        g.add("a", np.eye(4)[:1], ["x/1.png"])


def test_gallery_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--method"):
        GalleryConfig(method="svm")
    with pytest.raises(ConfigError, match="--similarity-threshold"):
        GalleryConfig(similarity_threshold=1.5)
    with pytest.raises(ConfigError, match="--knn-k"):
        GalleryConfig(k=0)


@pytest.mark.parametrize(("method", "k"), [("prototype", 1), ("knn", 1), ("knn", 3)])
def test_held_out_scores_equal_rebuilding_the_gallery_without_each_item(method, k):
    """The vectorised leave-one-out equals removing the item and scoring it again."""
    from imgtriage.models.gallery import held_out_scores

    g = _random_gallery(seed=1, n=30, k=3)
    g = g.add("lonely", np.random.default_rng(5).normal(size=(1, 8)), ["solo"])
    best, correct = held_out_scores(g, method, k)
    for i, (item, label) in enumerate(zip(g.ids, g.labels, strict=True)):
        if label == "lonely":  # alone in its class: nothing left to answer it with
            assert not correct[i]
            continue
        rest = g.remove(label, [item])
        sims = rest.similarities(g.embeddings[i:i + 1], method, k)[0]
        assert best[i] == pytest.approx(sims.max(), abs=1e-6)
        assert correct[i] == (rest.classes[int(sims.argmax())] == label)


def test_fitted_threshold_keeps_the_stated_share_of_correct_held_out_items():
    from imgtriage.models.gallery import FULL_COUNT, fit_similarity_threshold, held_out_scores

    g = _random_gallery(seed=2, n=200, d=6, k=5)
    t, fit = fit_similarity_threshold(g, GalleryConfig(), acceptance=0.9)
    best, correct = held_out_scores(g, full_count=True)  # a prototype gallery's correction
    assert fit["correction"] == FULL_COUNT
    kept = best[correct] >= t
    assert kept.mean() >= 0.9 and (best[correct] > t).mean() < 0.9  # the tightest such cut
    assert fit["threshold"] == t and fit["n_items"] == 200
    assert fit["held_out_coverage"] == pytest.approx(np.mean(best >= t))
    with pytest.raises(ConfigError, match="--acceptance"):
        fit_similarity_threshold(g, GalleryConfig(), acceptance=1.5)
