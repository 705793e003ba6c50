"""Files to gallery embeddings a batch at a time: unreadable files become defects (never
skipped silently), rows keep their files' order whatever the batch size, and the pretrained
encoder names the extra to install when its weights are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgtriage.data import PreprocessSpec
from imgtriage.errors import WeightsUnavailableError
from imgtriage.models.gallery_encoder import build_gallery_encoder
from imgtriage.models.pretrained import WEIGHTS
from imgtriage.predict.gallery_embed import embed_paths, encoder_runner, pretrained_encoder
from shared_helpers import write_digits_folder


def test_batches_keep_order_and_unreadable_files_are_defects(tmp_path):
    files = sorted(str(p) for p in write_digits_folder(tmp_path / "d", per_class=3, size=16,
                                                       classes=(1, 2)).rglob("*.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [*files[:2], str(bad), *files[2:]]
    torch.manual_seed(0)
    run = encoder_runner(build_gallery_encoder("siamese", 1, {"embed_dim": 8, "widths": [4]}))
    spec = PreprocessSpec.default_for(1, (16, 16))
    emb, kept, defects = embed_paths(run, paths, spec, batch_size=2, workers=1)
    assert kept == [0, 1, 3, 4, 5, 6] and [d.path for d in defects] == [str(bad)]
    whole, _, _ = embed_paths(run, files, spec, batch_size=64)
    np.testing.assert_allclose(emb, whole, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_pretrained_encoder_without_its_weights_names_the_extra(monkeypatch):
    monkeypatch.setattr(type(WEIGHTS["tf_efficientnet_lite0"]), "path", lambda self: None)
    with pytest.raises(WeightsUnavailableError, match=r"imgtriage\[pretrained\]"):
        pretrained_encoder("efficientnet_lite0")
