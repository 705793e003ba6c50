"""The end of training: a bundle carries a verified fp32 ONNX graph and, where its held-out
check accepts it, an int8 graph that is its default; an architecture that does not export keeps
torch and says why."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from imgtriage.bundle import load_bundle
from imgtriage.predict import Predictor

pytest.importorskip("onnxruntime")


def test_a_bundle_from_train_predicts_with_int8_by_default_when_accepted(tiny_bundle,
                                                                        digits_folder):
    b = load_bundle(tiny_bundle)  # --quantize static: no speed condition (a timing)
    info = b.manifest["onnx"]
    assert b.manifest["bundle_version"] == 1
    assert {"model.onnx", "model.int8.onnx"} <= set(b.manifest["files"])
    assert info["file"] == "model.onnx" and info["outputs"] == ["logits"]
    assert info["parity_max_abs_dprob"] <= 1e-4  # the fp32 graph, against torch
    assert info["parity_images"] == 16  # real validation images, not random tensors
    q = info["int8"]  # judged on all 40 validation images, calibrated on 64 training images
    assert (q["mode"], q["n_calib"], q["n_images"]) == ("static", 64, 40)
    assert q["agreement"] >= 0.99 and q["accuracy_fp32"] - q["accuracy_int8"] <= 0.005
    assert q["accepted"] == q["reason"] and info["precision"] == "int8"
    assert q["disagreement_upper95"] > 0.07  # 40 images are weak evidence, and it says so
    speed = q["speed"]  # measured and recorded, not part of a static verdict
    assert speed["rounds"] == 3 and 0 < speed["low"] <= speed["ratio"] <= speed["high"]
    assert speed["images"] == 40 and "fp32's speed on the machine that judged it" in q["reason"]
    p = Predictor.load(tiny_bundle)
    assert (p.runtime.backend, p.runtime.precision) == ("onnx", "int8")
    assert "int8 accepted: agreement" in p.runtime.note
    paths = sorted(str(f) for f in digits_folder.rglob("*.png"))[::7]
    got = p.predict_paths(paths, include_probs=True)
    assert (got["meta"]["backend"], got["meta"]["precision"]) == ("onnx", "int8")
    asked = Predictor.load(tiny_bundle, precision="int8").predict_paths(paths,
                                                                        include_probs=True)
    fp32 = Predictor.load(tiny_bundle, precision="fp32").predict_paths(paths,
                                                                       include_probs=True)
    pd, pi, pf = (np.array([list(r["probs"].values()) for r in rep["results"]])
                  for rep in (got, asked, fp32))
    assert np.array_equal(pd, pi)  # the default is the int8 graph ...
    assert 0 < np.abs(pd - pf).max() < 0.05  # ... really quantised, and close to fp32


def test_the_fp32_graph_matches_torch_within_1e4(tiny_bundle, digits_folder):
    """Parity of the fp32 graph (asked for explicitly: the bundle's default is int8)."""
    paths = sorted(str(f) for f in digits_folder.rglob("*.png"))[::7]
    got = Predictor.load(tiny_bundle, precision="fp32").predict_paths(paths, include_probs=True)
    ref = Predictor.load(tiny_bundle, backend="torch").predict_paths(paths, include_probs=True)
    assert (got["meta"]["backend"], got["meta"]["precision"]) == ("onnx", "fp32")
    assert ref["meta"]["backend"] == "torch"
    po = np.array([list(r["probs"].values()) for r in got["results"]])
    pt = np.array([list(r["probs"].values()) for r in ref["results"]])
    assert po.shape == (len(paths), 10) and np.abs(po - pt).max() <= 1e-4


def test_int8_that_disagrees_is_refused_and_fp32_kept(digits_folder, tmp_path, monkeypatch,
                                                      capsys):
    """A real static int8 graph, calibrated on images 100x too faint: its activation ranges
    are far too narrow, so real images saturate them and it disagrees with fp32."""
    from imgtriage.predict import int8
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    quantize = int8._quantize
    monkeypatch.setattr(int8, "_quantize", lambda g, mode, calib: quantize(g, mode, calib / 100))
    cfg = TrainConfig(model="crop_cnn", img_size=32, epochs=3, batch_size=32, lr=3e-3,
                      num_threads=1, calibrate=False)
    res = train(digits_folder, tmp_path / "run", cfg)
    m = load_bundle(res.bundle_path).manifest
    info, q = m["onnx"], m["onnx"]["int8"]
    assert m["training"]["config"]["quantize"] == "auto"
    assert not q["accepted"] and q["agreement"] < 0.99 and q["n_images"] == 40
    assert q["refused"] == q["reason"] and "agreement" in q["reason"]
    assert info["precision"] == "fp32" and "model.int8.onnx" in m["files"]
    err = capsys.readouterr().err
    assert "-> fp32 kept: agreement" in err and "int8 refused, fp32 kept: agreement" in err
    p = Predictor.load(res.bundle_path)
    assert (p.runtime.backend, p.runtime.precision) == ("onnx", "fp32")
    assert p.runtime.note == f"int8 refused: {q['reason']}"
    assert Predictor.load(res.bundle_path, precision="int8").runtime.precision == "int8"


def test_without_enough_held_out_images_auto_keeps_fp32_and_static_refuses_up_front(
        tmp_path, monkeypatch):
    from imgtriage.errors import ConfigError
    from imgtriage.predict import int8
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train
    from shared_helpers import write_digits_folder

    def never(*_a):
        raise AssertionError("int8 must not be tried without enough held-out images")

    monkeypatch.setattr(int8, "_quantize", never)
    data = write_digits_folder(tmp_path / "data", per_class=8, size=16, classes=(0, 1, 2))
    base = TrainConfig(model="crop_cnn", img_size=16, epochs=1, batch_size=8, num_threads=1)
    why = {0.0: "no validation images: int8 is judged only on held-out images",
           0.25: "only 6 readable validation images to judge int8 on (need 30)"}
    for val_frac, reason in why.items():
        res = train(data, tmp_path / f"run{val_frac}", replace(base, val_frac=val_frac),
                    quiet=True)
        m = load_bundle(res.bundle_path).manifest
        assert m["onnx"]["precision"] == "fp32" and "model.int8.onnx" not in m["files"]
        assert m["onnx"]["int8"]["refused"].startswith(reason)
        assert Predictor.load(res.bundle_path).runtime.note.startswith(f"int8 refused: {reason}")
    with pytest.raises(ConfigError, match="--quantize static judges int8 on held-out"):
        train(data, tmp_path / "static", replace(base, val_frac=0.0, quantize="static"),
              quiet=True)
    with pytest.raises(ConfigError, match="--quantize"):
        TrainConfig(model="fusion", quantize="static")


def test_int8_is_judged_on_the_default_rules_decisions_too(calibrated_run):
    """The calibrated bundle abstains (confidence and OOD thresholds fitted on fp32): its
    verdict records how often int8's decisions equal fp32's on the held-out images, which is
    what predict gives on those files."""
    import csv

    m = load_bundle(calibrated_run.bundle_path).manifest
    q = m["onnx"]["int8"]
    assert m["decision"]["abstain"] and m["decision"]["ood"]["method"] == "knn+rmd+stages"
    with (calibrated_run.run_dir / "splits.csv").open() as fh:
        val = [r["path"] for r in csv.DictReader(fh) if r["split"] == "val"]
    assert len(val) == q["n_images"] == 40

    def outcomes(precision):
        p = Predictor.load(calibrated_run.bundle_path, precision=precision, num_threads=1)
        return [-1 if r["abstained"] else r["class_id"]
                for r in p.predict_paths(val)["results"]]

    same = np.mean(np.array(outcomes("fp32")) == np.array(outcomes("int8")))
    assert q["decision_agreement"] == pytest.approx(same)
    drop = q["accuracy_fp32"] - q["accuracy_int8"]
    proven = q["agreement"] >= 0.99 and same >= 0.99 and drop <= 0.005
    assert bool(q["accepted"]) == proven and m["onnx"]["precision"] == ("int8" if proven
                                                                        else "fp32")


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


def _slow(ratio):
    from imgtriage.predict.int8 import SpeedCheck

    return lambda fp32, q, x: SpeedCheck(ratio, ratio - 0.05, ratio + 0.05, 3, len(x), 2,
                                         "fp32 / int8: 2 session(s) x 1 thread(s), batch 64")


@pytest.mark.parametrize("quantize", ["auto", "static"])
def test_auto_keeps_fp32_when_int8_is_no_faster_and_static_does_not_ask(
        quantize, digits_folder, tmp_path, monkeypatch, capsys):
    """An exact int8 graph (the fp32 graph itself) that the timing finds at 0.8x fp32's speed:
    the default (auto) keeps fp32 and says so, int8 stays askable; static accepts it."""
    from imgtriage.predict import int8
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    monkeypatch.setattr(int8, "_quantize", lambda graph, mode, calib: graph)
    monkeypatch.setattr(int8, "measure_speed", _slow(0.8))
    cfg = TrainConfig(model="crop_cnn", img_size=16, epochs=1, batch_size=32, num_threads=1,
                      calibrate=False, quantize=quantize)
    res = train(digits_folder, tmp_path / "run", cfg)
    info = load_bundle(res.bundle_path).manifest["onnx"]
    q = info["int8"]
    assert q["agreement"] == 1.0 and q["speed"]["ratio"] == 0.8
    assert "int8 runs at 0.80x fp32's speed on the machine that judged it" in q["reason"]
    err = capsys.readouterr().err
    if quantize == "auto":
        assert not q["accepted"] and info["precision"] == "fp32"
        assert q["refused"].startswith("as exact as fp32 (agreement 100.0%")
        assert "< 1.10x; --precision int8 still runs it" in q["refused"]
        assert "-> fp32 kept: as exact as fp32" in err
        p = Predictor.load(res.bundle_path)
        assert p.runtime.precision == "fp32" and "0.80x" in p.runtime.note
        assert Predictor.load(res.bundle_path, precision="int8").runtime.precision == "int8"
    else:
        assert q["accepted"] and info["precision"] == "int8"
        assert Predictor.load(res.bundle_path).runtime.precision == "int8"


def test_the_speed_check_times_both_graphs_in_the_backends_layout(tiny_bundle, digits_folder):
    from imgtriage.predict.int8 import measure_speed
    from imgtriage.predict.onnx_backend import session_layout

    b = load_bundle(tiny_bundle)
    fp32, q = b.verified_bytes("model.onnx"), b.verified_bytes("model.int8.onnx")
    x = np.random.default_rng(0).normal(size=(300, 1, 32, 32)).astype(np.float32)
    s = measure_speed(fp32, q, x, threads=2, rounds=3, min_s=0.01)
    assert s.rounds == 3 and s.threads == 2 and np.isfinite(s.ratio)
    assert 0 < s.low <= s.ratio <= s.high
    lay = session_layout(len(fp32), 2)
    assert s.images == 2 * lay.batch_size == 128  # two of the backend's batches, not all 300
    assert s.layout.startswith(f"fp32 / int8: {lay.sessions} session(s) x 1 thread(s)")


def test_session_layouts_follow_the_graph_size():
    from imgtriage.errors import ConfigError
    from imgtriage.predict.onnx_backend import session_layout

    assert session_layout(1_000, 2) == session_layout(1_000, 2, "auto")
    small, big = session_layout(1_000, 4), session_layout(50_000_000, 4)
    assert (small.sessions, small.threads_each, small.batch_size) == (4, 1, 64)
    assert (big.sessions, big.threads_each, big.batch_size) == (1, 4, 16)
    assert session_layout(1_000, 4, sessions=2).threads_each == 2
    assert session_layout(1_000, 1).sessions == 1
    for bad in (0, "two", True):
        with pytest.raises(ConfigError, match="sessions must be"):
            session_layout(1_000, 2, sessions=bad)
    with pytest.raises(ConfigError, match="--threads"):
        session_layout(1_000, 0)
