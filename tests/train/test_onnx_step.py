"""The end of training: a bundle carries a verified fp32 ONNX graph and predicts with it by
default; an architecture that does not export keeps torch and says why."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.bundle import load_bundle
from imgtriage.predict import Predictor

pytest.importorskip("onnxruntime")


def test_a_bundle_from_train_predicts_with_onnx_by_default(tiny_bundle, digits_folder):
    b = load_bundle(tiny_bundle)
    info = b.manifest["onnx"]
    assert b.manifest["bundle_version"] == 1 and "model.onnx" in b.manifest["files"]
    assert info["file"] == "model.onnx" and info["precision"] == "fp32"
    assert info["outputs"] == ["logits"] and info["parity_max_abs_dprob"] <= 1e-4
    assert info["parity_images"] == 16  # real validation images, not random tensors
    p = Predictor.load(tiny_bundle)
    assert (p.runtime.backend, p.runtime.precision) == ("onnx", "fp32")
    paths = sorted(str(f) for f in digits_folder.rglob("*.png"))[::7]
    got = p.predict_paths(paths, include_probs=True)
    ref = Predictor.load(tiny_bundle, backend="torch").predict_paths(paths, include_probs=True)
    assert got["meta"]["backend"] == "onnx" and ref["meta"]["backend"] == "torch"
    po = np.array([list(r["probs"].values()) for r in got["results"]])
    pt = np.array([list(r["probs"].values()) for r in ref["results"]])
    assert po.shape == (len(paths), 10) and np.abs(po - pt).max() <= 1e-4


@pytest.mark.parametrize("failure", ["exporter", "parity"])
def test_a_model_that_does_not_export_keeps_torch_and_says_why(failure, tmp_path, monkeypatch,
                                                               capsys):
    from imgtriage.predict import graph
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train
    from shared_helpers import write_digits_folder

    if failure == "exporter":
        def broken(*_a, **_k):
            raise RuntimeError("Exporting the operator 'FancyOp' to ONNX is not supported")

        monkeypatch.setattr(graph, "_torch_to_onnx", broken)
        why = "FancyOp"
    else:  # ORT answers, but not like torch: refused, never shipped
        monkeypatch.setattr(graph, "_parity", lambda *_a: 0.25)
        why = "does not export faithfully"
    data = write_digits_folder(tmp_path / "data", per_class=8, size=16, classes=(0, 1, 2))
    cfg = TrainConfig(model="crop_cnn", img_size=16, epochs=1, batch_size=8, num_threads=1)
    res = train(data, tmp_path / "run", cfg)
    m = load_bundle(res.bundle_path).manifest
    assert "model.onnx" not in m["files"] and m["onnx"]["file"] is None
    assert why in m["onnx"]["reason"]
    assert "predicts with torch: ONNX export failed" in capsys.readouterr().err
    p = Predictor.load(res.bundle_path)
    assert p.runtime.backend == "torch" and why in p.runtime.note
    assert p.predict_paths([data])["meta"]["backend"] == "torch"


def test_train_quantize_static_calibrates_on_train_and_judges_on_val(digits_folder, tmp_path,
                                                                     monkeypatch, capsys):
    from imgtriage.predict import int8
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    seen = {}

    def as_fp32(graph, mode, calib):  # an "int8" graph that cannot disagree: must be accepted
        seen["calib"] = calib
        return graph

    monkeypatch.setattr(int8, "_quantize", as_fp32)
    cfg = TrainConfig(model="crop_cnn", img_size=16, epochs=1, batch_size=32, num_threads=1,
                      quantize="static")
    res = train(digits_folder, tmp_path / "run", cfg)
    info = load_bundle(res.bundle_path).manifest["onnx"]
    q = info["int8"]
    assert (q["n_calib"], q["n_images"]) == (64, res.metrics["val_count"]) == (64, 40)
    assert seen["calib"].shape == (64, 1, 16, 16)
    assert q["accepted"] and q["agreement"] == 1.0 and info["precision"] == "int8"
    assert "int8 is the default" in capsys.readouterr().err
    assert Predictor.load(res.bundle_path).runtime.precision == "int8"
