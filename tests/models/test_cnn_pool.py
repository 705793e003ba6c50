"""Global pooling of the from-scratch CNNs: avg (default), max and avgmax."""

from __future__ import annotations

import pytest
import torch

from imgtriage.errors import ConfigError
from imgtriage.models import create_model


@pytest.mark.parametrize("name", ["crop_cnn", "deep_cnn"])
@pytest.mark.parametrize("pool, mult", [("avg", 1), ("max", 1), ("avgmax", 2)])
def test_pool_kinds_give_logits_and_embeddings(name, pool, mult):
    torch.manual_seed(0)
    m = create_model(name, 3, 1, global_pool=pool).eval()
    x = torch.randn(2, 1, 48, 40)
    assert m(x).shape == (2, 3)
    widths = 128 if name == "crop_cnn" else 256
    assert m.forward_features(x).shape == (2, widths * mult) and m.num_features == widths * mult


def test_max_pool_keeps_a_small_local_spot_that_avg_dilutes():
    torch.manual_seed(0)
    avg = create_model("crop_cnn", 2, 1, global_pool="avg").eval()
    mx = create_model("crop_cnn", 2, 1, global_pool="max").eval()
    mx.load_state_dict(avg.state_dict())  # same weights: the pool has none
    clean = torch.zeros(1, 1, 96, 96)
    spot = clean.clone()
    spot[..., 40:43, 40:43] = 5.0  # a 3x3 defect on a 96x96 surface
    with torch.no_grad():
        d_avg = (avg.forward_features(spot) - avg.forward_features(clean)).abs().max()
        d_max = (mx.forward_features(spot) - mx.forward_features(clean)).abs().max()
    assert d_max > 5 * d_avg


def test_unknown_pool_is_refused_with_the_flag():
    with pytest.raises(ConfigError, match="model-kwargs"):
        create_model("crop_cnn", 2, 1, global_pool="median")


def test_default_state_dict_layout_is_unchanged():
    keys = set(create_model("crop_cnn", 2, 1).state_dict())
    assert "head.weight" in keys and not any(k.startswith("pool.") for k in keys)
