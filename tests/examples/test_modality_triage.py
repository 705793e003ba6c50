"""The modality-triage recipe (examples/modality-triage/run.py), reduced: 30 images per class
at 32 px, one epoch, one timed round, four files through the live service."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_helpers import REPO, shared_dataset

pytestmark = [pytest.mark.shared, pytest.mark.slow]

SCRIPT = REPO / "examples" / "modality-triage" / "run.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_modality_triage", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shared() -> Path:
    for name in ("cifar10-small", "sirst-infrared", "mstar-soc10"):
        path = shared_dataset(name)
    return path.parent


def _in_unit(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def test_reduced_recipe_is_coherent(tmp_path):
    from imgtriage.predict import Predictor

    recipe = _recipe()
    out = tmp_path / "out"
    res = recipe.main(["--shared", str(_shared()), "--out", str(out), "--per-class", "30",
                       "--size", "32", "--epochs", "1", "--repeats", "1", "--serve-files", "4",
                       "--threads", "1", "--gate-confidence", "0"])  # 14 validation images
    assert json.loads((out / "results.json").read_text())["test"]["files"] == res["test"]["files"]
    # the dataset: three classes, one size for all
    assert res["dataset"]["counts"] == {"rgb": 30, "infrared": 30, "sar": 30}
    sizes = {Image.open(p).size for p in (out / "data").rglob("*.png")}
    assert sizes == {(32, 32)}
    assert "from scratch" in res["cnn"]["weights"] and res["cnn"]["pretrained"] is None
    # every test file answered once by both predictors; metrics in range
    files, _ = recipe.split_files(out / "cnn", "test")
    assert res["test"]["files"] == len(files) > 0
    for name, r in res["test"]["by_predictor"].items():
        assert r["files"] == r["results"] + r["defects"] == len(files), name
        assert r["defects"] == 0
        assert _in_unit(r["accuracy"]) and _in_unit(r["coverage"]), name
        assert _in_unit(r["skipped_cnn"]) and r["files_per_s"] > 0
        assert set(r["recall"]) == {"infrared", "rgb", "sar"}
        assert all(_in_unit(v) for v in r["recall"].values())
        wrong = res["test"]["mistakes"][name]
        assert round(r["accuracy"] * len(files)) == len(files) - len(wrong), name
    assert res["test"]["by_predictor"]["cnn alone"]["skipped_cnn"] == 0
    v = res["cascade"]["validation"]
    assert _in_unit(v["accepted_share"]) and _in_unit(v["cascade_accuracy"])
    sar = v["test_always_second_stage"]  # --always-second-stage sar (the default)
    assert sar["files"] > 0 and sar["to_stage2"] == sar["files"]
    # the bundles load; the service answered exactly as Predictor does
    cascade = Predictor.load(res["cascade"]["bundle"])
    assert cascade.classes == Predictor.load(res["cnn"]["bundle"]).classes == res["classes"]
    served = res["serve"]
    assert served["files"] == 4 and served["all_equal"] and served["equal_to_predictor"] == 4
    assert served["served_stage1"] + served["served_stage2"] == 4
    assert served["bundle_sha256"] == cascade.bundle_sha256


def test_missing_weights_fall_back_to_scratch_with_a_note(tmp_path):
    recipe = _recipe()
    weights, note = recipe.weights_choice(str(tmp_path / "nope.safetensors"), "resnet18")
    assert weights is False and "does not exist" in note and "from scratch" in note
    weights, note = recipe.weights_choice(None, "resnet18")
    assert weights is False and "--pretrained" in note


def test_local_weights_file_is_transfer_learning(tmp_path):
    import timm
    from safetensors.torch import save_file

    recipe = _recipe()
    data = tmp_path / "data"
    recipe.build_dataset(_shared(), data, per_class=8, size=32)
    file = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), str(file))
    args = recipe.parse_args(["--pretrained", str(file), "--epochs", "2", "--size", "32",
                              "--threads", "1"])
    bundle, info = recipe.train_backbone(data, tmp_path / "cnn", args)
    assert info["pretrained"] == str(file) and info["weights"].startswith("transfer learning")
    cfg = json.loads((tmp_path / "cnn" / "config.json").read_text())
    assert cfg["pretrained"] == str(file) and cfg["freeze_epochs"] == 1
    assert np.isfinite(info["val_metrics"]["val_accuracy"])
    assert (bundle / "manifest.json").is_file()
