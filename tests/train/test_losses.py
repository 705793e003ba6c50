"""Loss strategies on a deliberately imbalanced label set: weights, caps, focal, smoothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from imgtriage.train.config import TrainConfig
from imgtriage.train.losses import TrainLoss, class_weights, plan_loss

COUNTS = np.array([100, 20, 5])  # deliberately imbalanced
LABELS = np.repeat(np.arange(3), COUNTS)


def test_inverse_frequency_weights_are_normalised_per_sample():
    w = class_weights(COUNTS, beta=1.0, cap=0)
    # (1/n) scaled so that sum(n_c w_c) == N: each class contributes N/3 in total
    np.testing.assert_allclose(w, np.array([1 / 100, 1 / 20, 1 / 5]) * 125 / 3)
    np.testing.assert_allclose((COUNTS * w).sum(), COUNTS.sum())
    np.testing.assert_allclose(COUNTS * w, [125 / 3] * 3)


def test_power_smoothing_beta():
    w = class_weights(COUNTS, beta=0.5, cap=0)
    raw = 1 / np.sqrt(COUNTS)
    np.testing.assert_allclose(w, raw * COUNTS.sum() / (COUNTS * raw).sum())
    assert np.allclose(class_weights(COUNTS, beta=0.0), 1.0)  # beta 0: uniform


def test_cap_is_a_multiple_of_the_median_before_normalising():
    w = class_weights(COUNTS, beta=1.0, cap=2.0)
    # raw [0.01, 0.05, 0.2]; median 0.05 -> cap 0.1; raw capped [0.01, 0.05, 0.1];
    # sum(n w) = 2.5 -> scale 125 / 2.5 = 50
    np.testing.assert_allclose(w, [0.5, 2.5, 5.0])
    assert w.max() / np.median(w) == pytest.approx(2.0)


def test_class_without_samples_gets_a_finite_weight():
    w = class_weights([10, 0, 5], beta=1.0)
    assert np.isfinite(w).all() and w[1] == w.max()
    np.testing.assert_allclose(10 * w[0] + 5 * w[2], 15)


def test_plan_none_class_weights_and_focal():
    assert plan_loss(TrainConfig(), LABELS, 3).weights is None
    cw = plan_loss(TrainConfig(loss_strategy="class_weights", class_weight_beta=1,
                               class_weight_cap=2), LABELS, 3)
    np.testing.assert_allclose(cw.weights, [0.5, 2.5, 5.0])
    assert cw.gamma == 0
    focal = plan_loss(TrainConfig(loss_strategy="focal", class_weight_beta=1,
                                  class_weight_cap=2, focal_gamma=1.5), LABELS, 3)
    np.testing.assert_allclose(focal.weights, cw.weights)  # alpha derived the same way
    assert focal.gamma == 1.5


@pytest.mark.parametrize("strategy", ["class_weights", "focal"])
def test_balanced_sampling_switches_per_sample_weights_off(strategy):
    plan = plan_loss(TrainConfig(loss_strategy=strategy, balanced_sampling=True), LABELS, 3)
    assert plan.weights is None and "balanced-sampling" in plan.note
    assert plan.gamma == (2.0 if strategy == "focal" else 0.0)  # focal keeps its gamma


def test_plain_loss_is_cross_entropy_with_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    assert torch.allclose(TrainLoss(3)(logits, y), F.cross_entropy(logits, y))
    assert torch.allclose(TrainLoss(3, label_smoothing=0.1)(logits, y),
                          F.cross_entropy(logits, y, label_smoothing=0.1))


def test_weighted_loss_is_mean_of_weighted_sample_losses():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    w = torch.tensor([0.5, 2.5, 5.0])
    expected = (F.cross_entropy(logits, y, reduction="none") * w[y]).mean()
    assert torch.allclose(TrainLoss(3, w.tolist())(logits, y), expected)


def test_focal_loss_matches_its_formula():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    alpha = torch.tensor([0.5, 2.5, 5.0])
    p = logits.softmax(1)[torch.arange(16), y]
    expected = (-alpha[y] * (1 - p) ** 2 * p.log()).mean()
    assert torch.allclose(TrainLoss(3, alpha.tolist(), gamma=2.0)(logits, y), expected,
                          atol=1e-6)
    # gamma 0 without alpha is plain cross entropy
    assert torch.allclose(TrainLoss(3, None, gamma=0.0)(logits, y), F.cross_entropy(logits, y))


def test_focal_down_weights_easy_examples():
    easy = torch.tensor([[6.0, 0.0, 0.0]])
    hard = torch.tensor([[0.5, 0.0, 0.0]])
    y = torch.tensor([0])
    ce, fl = TrainLoss(3), TrainLoss(3, gamma=2.0)
    assert fl(easy, y) / ce(easy, y) < 0.01 < fl(hard, y) / ce(hard, y)


def test_bad_settings_name_the_flag():
    from imgtriage.errors import ConfigError

    with pytest.raises(ConfigError, match="--loss-strategy"):
        TrainConfig(loss_strategy="weighted")
    with pytest.raises(ConfigError, match="--class-weight-cap"):
        TrainConfig(class_weight_cap=0.5)
    with pytest.raises(ConfigError, match="--max-repeat"):
        TrainConfig(max_repeat=0)


def test_prior_offsets_undo_the_prior_the_loss_saw():
    from imgtriage.train.losses import prior_offsets

    plain = prior_offsets(COUNTS, None)  # -log prior, centred
    np.testing.assert_allclose(plain - plain[0], -np.log(COUNTS / COUNTS[0]))
    assert abs(plain.sum()) < 1e-9
    # full inverse-frequency weights already equalise the prior: nothing left to correct
    np.testing.assert_allclose(prior_offsets(COUNTS, class_weights(COUNTS, 1.0, 0)), 0,
                               atol=1e-9)
    # square-root weights undo half of it
    half = prior_offsets(COUNTS, class_weights(COUNTS, 0.5, 0))
    np.testing.assert_allclose(half, plain / 2)
    # an absent class gets no offset and does not move the others' centre
    np.testing.assert_allclose(prior_offsets([100, 0, 25], None),
                               [-np.log(2), 0.0, np.log(2)])


@pytest.mark.parametrize(("kw", "applied"), [
    ({"select_metric": "val_balanced_accuracy"}, True),
    ({"select_metric": "val_balanced_accuracy", "loss_strategy": "class_weights"}, True),
    ({"select_metric": "val_accuracy"}, False),
    ({"select_metric": "val_accuracy", "prior_correction": "on"}, True),
    ({"select_metric": "val_balanced_accuracy", "prior_correction": "off"}, False),
    ({"select_metric": "val_balanced_accuracy", "balanced_sampling": True}, False),
    ({"select_metric": "val_balanced_accuracy", "loss_strategy": "class_weights",
      "class_weight_beta": 1.0, "class_weight_cap": 0.0}, False),
])
def test_plan_says_when_the_decision_is_prior_corrected(kw, applied):
    from imgtriage.train.losses import prior_offsets

    plan = plan_loss(TrainConfig(**kw), LABELS, 3)
    assert (plan.prior_offsets is not None) is applied
    assert plan.prior_note.startswith("prior correction")
    if applied:
        np.testing.assert_allclose(plan.prior_offsets, prior_offsets(COUNTS, plan.weights))
        assert plan.to_dict()["prior_correction"] == list(plan.prior_offsets)
