"""--model auto at the label counts the signal-lab recipe uses: 25 / 100 / 500 labels."""

from __future__ import annotations

import doctest

import pytest

from imgtriage.train import auto
from imgtriage.train.auto import ImageProbe, choose_model

PROBE = ImageProbe(1, (64, 64), 32)


def _spread(total: int, classes: int = 9) -> dict[str, int]:
    """``total`` labels spread as evenly as possible over ``classes`` classes."""
    return {f"c{i}": total // classes + (i < total % classes) for i in range(classes)}


@pytest.mark.parametrize(("total", "model"), [(25, "siamese"), (99, "siamese"),
                                              (100, "crop_cnn"), (499, "crop_cnn"),
                                              (500, "deep_cnn"), (2000, "deep_cnn")])
def test_label_budget_picks_the_model(total, model):
    choice = choose_model(_spread(total), PROBE)
    assert choice.model == model
    assert f"{total} training labels" in choice.reason


def test_few_per_class_stays_shallow_even_with_500_labels():
    counts = {**_spread(400, 4), **{f"r{i}": 20 for i in range(5)}}  # median 20 per class
    assert sum(counts.values()) == 500
    assert choose_model(counts, PROBE).model == "crop_cnn"


def test_small_images_keep_crop_cnn_at_500_labels():
    assert choose_model(_spread(500), ImageProbe(1, (32, 32), 32)).model == "crop_cnn"


def test_docstring_examples():
    assert doctest.testmod(auto, raise_on_error=False).failed == 0
