"""A gallery's logit scale fitted like a temperature on held-out similarities (issue 15):
on synthetic galleries (the math); bundles, edits and the CLI are in test_gallery_kind.py."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.evaluate import expected_calibration_error, nll_at_temperature, softmax
from imgtriage.models.gallery import Gallery, GalleryConfig, held_out_similarities
from imgtriage.predict.gallery_scale import (
    LOO_RULE,
    fit_scale,
    fixed_scale,
    held_out_scale,
    scale_is_fixed,
)


def _clusters(spread: float, seed: int = 0, n_classes: int = 5, per: int = 8, d: int = 16
              ) -> Gallery:
    """``per`` items around each of ``n_classes`` random centres; ``spread`` the noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    x = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_classes * per, d))
    labels = [f"c{i}" for i in range(n_classes) for _ in range(per)]
    return Gallery.build(x, labels, [f"i{j}" for j in range(len(labels))])


@pytest.mark.parametrize(("spread", "method", "k"), [(1.5, "prototype", 1), (3.0, "prototype", 1),
                                                     (2.0, "knn", 3)])
def test_fitted_scale_lowers_the_held_out_nll(spread, method, k):
    g = _clusters(spread)
    cfg = GalleryConfig(method=method, k=k)
    new, rec = held_out_scale(g, cfg)
    sims, y = held_out_similarities(g, method, k)
    before = nll_at_temperature(sims * cfg.scale, y, 1.0)
    after = nll_at_temperature(sims * new.scale, y, 1.0)
    assert rec["kept"] and new.scale != cfg.scale and after < before
    assert rec["nll_before"] == pytest.approx(before) and rec["nll_after"] == pytest.approx(after)
    assert rec["ece_before"] == pytest.approx(expected_calibration_error(
        softmax(sims * cfg.scale), y))
    assert rec["n"] == rec["n_items"] == len(g) and rec["rule"] == LOO_RULE
    assert f"{new.scale:.4g}" in rec["line"] and "NLL" in rec["line"] and "ECE" in rec["line"]
    # the rest of the rule is untouched, and the answers (argmax) are the same at any scale
    assert (new.method, new.k, new.similarity_threshold) == (method, k, None)
    assert (np.argmax(sims * new.scale, 1) == np.argmax(sims * cfg.scale, 1)).all()


def test_tight_clusters_sharpen_and_loose_ones_soften():
    tight = held_out_scale(_clusters(0.3), GalleryConfig())[0].scale
    loose = held_out_scale(_clusters(3.0), GalleryConfig())[0].scale
    assert tight > 10 > loose


def test_a_scale_already_at_the_optimum_is_kept_with_the_reason():
    g = _clusters(2.0)
    best = held_out_scale(g, GalleryConfig())[0]
    again, rec = held_out_scale(g, best)
    assert again.scale == best.scale and not rec["kept"]
    assert "did not lower the held-out NLL" in rec["line"]
    assert rec["nll_after"] == rec["nll_before"]


def test_the_fit_goes_through_the_decision_temperature():
    """A bundle calibrated since (decision T) answers softmax(scale * s / T): the refit
    makes that calibrated, so scale / T is what a fit without T gives."""
    g = _clusters(2.0)
    plain = held_out_scale(g, GalleryConfig())[0].scale
    with_t = held_out_scale(g, GalleryConfig(), temperature=2.0)[0].scale
    assert with_t / 2.0 == pytest.approx(plain, rel=1e-3)


def test_too_few_held_out_items_keep_the_scale_and_say_why():
    g = Gallery.build(np.eye(4), ["a", "b", "c", "d"], list("1234"))  # one item per class
    new, rec = held_out_scale(g, GalleryConfig(scale=7.0))
    assert new.scale == 7.0 and not rec["kept"] and rec["n"] == 0
    assert "enrol two or more" in rec["line"]
    # rows held out of a class with nothing left to match are left out of a fit
    sims = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, -np.inf], [0.8, 0.3], [0.1, 0.6]])
    _, rec = fit_scale(sims, np.array([0, 1, 1, 0, 1]), 10.0, rule="test")
    assert rec["n"] == 4


def test_a_given_scale_is_fixed_and_old_bundles_count_a_non_default_one_as_given():
    rec = fixed_scale(20.0, "--scale")
    assert rec["fixed"] and rec["scale"] == 20.0 and "given" in rec["line"]
    assert scale_is_fixed(rec, 20.0)
    assert not scale_is_fixed(held_out_scale(_clusters(2.0), GalleryConfig())[1], 3.0)
    assert scale_is_fixed(None, 20.0) and not scale_is_fixed(None, 10.0)
