"""The features tap: penultimate features, then each earlier stage's map statistics."""

from __future__ import annotations

import pytest
import torch

from imgtriage.models import WithFeatures, create_model
from imgtriage.models.penultimate import stage_modules


def test_crop_cnn_taps_every_block_but_the_last_and_keeps_its_penultimate_features():
    model = create_model("crop_cnn", 3, 1, widths=[4, 8, 16]).eval()
    x = torch.rand(5, 1, 32, 32)
    logits, plain = WithFeatures(model)(x)
    tap = WithFeatures(model, stages=True)
    logits2, feats = tap(x)
    assert tap.stage_widths == (8, 16)  # mean + std of the 4- and 8-channel blocks
    assert feats.shape == (5, 16 + 8 + 16)
    torch.testing.assert_close(feats[:, :16], plain)
    torch.testing.assert_close(logits2, logits)
    # the statistics of one image do not depend on the others in its batch
    torch.testing.assert_close(tap(x[:1])[1], feats[:1], rtol=1e-5, atol=1e-6)
    # a brighter image changes the early statistics (what refuses another kind of input)
    assert not torch.allclose(tap(x * 4)[1][:, 16:], feats[:, 16:])


def test_timm_models_use_their_feature_info_stages():
    pytest.importorskip("timm")
    model = create_model("efficientnet_lite0", 3, 3, pretrained="none").eval()
    names = [d["module"] for d in model.feature_info][:-1]
    assert stage_modules(model) == [model.get_submodule(n) for n in names]
    tap = WithFeatures(model, stages=True)
    _, feats = tap(torch.rand(2, 3, 64, 64))
    assert tap.stage_widths == tuple(2 * d["num_chs"] for d in model.feature_info[:-1])
    assert feats.shape[1] == model.num_features + sum(tap.stage_widths)
    assert torch.isfinite(feats).all()


def test_a_view_averaging_model_averages_the_statistics_of_its_views():
    model = create_model("crop_cnn", 3, 1, widths=[4, 8], view_average=["hflip"]).eval()
    x = torch.rand(3, 1, 16, 16)
    tap = WithFeatures(model, stages=True)
    _, feats = tap(x)
    assert feats.shape == (3, 8 + 8)
    # the image and its mirror give the same averaged statistics
    torch.testing.assert_close(tap(x.flip(-1))[1], feats, rtol=1e-4, atol=1e-5)


def test_a_model_without_stages_taps_its_penultimate_features_alone():
    from torch import nn

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.body(x))

    tap = WithFeatures(Flat(), stages=True)
    _, feats = tap(torch.rand(4, 6))
    assert stage_modules(Flat()) == [] and tap.stage_widths == () and feats.shape == (4, 5)
