"""ONNX export: a new bundle version, torch/ONNX parity, int8 judged on held-out images and
made the default only when proven."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from imgtriage.bundle import load_bundle
from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor
from imgtriage.predict.export import export_onnx
from shared_helpers import without_graph

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory, digits_folder):
    """A copy of the tiny bundle with model.onnx and a static int8 graph."""
    dest = tmp_path_factory.mktemp("exp") / "bundle"
    shutil.copytree(tiny_bundle, dest)
    lines: list[str] = []
    res = export_onnx(dest, quantize="static", calib=digits_folder, calib_images=40,
                      log=lines.append)
    return dest, res, lines


def test_export_writes_a_new_version_and_keeps_the_old_manifest(exported, tiny_bundle):
    dest, res, _ = exported
    b = load_bundle(dest)
    m = b.manifest
    assert m["bundle_version"] == 2 and m["history"][-1]["version"] == 1
    old = json.loads(b.verified_bytes("history/manifest.v1.json"))
    assert old == load_bundle(tiny_bundle).manifest
    assert {"model.onnx", "model.int8.onnx", "weights.safetensors"} <= set(m["files"])
    info = m["onnx"]
    assert info["dynamic_batch"] and info["precision"] == "int8" == res.precision
    assert info["parity_max_abs_dprob"] <= 1e-4 and "to_input" in info["input_is"]
    import onnx

    proto = onnx.load_from_string(b.verified_bytes("model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["imgtriage.preprocess"]) == m["preprocess"]
    assert json.loads(props["imgtriage.classes"]) == b.classes
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch"  # dynamic batch axis


def test_torch_and_onnx_agree_within_1e4(exported, digits_folder):
    dest, _, _ = exported
    paths = sorted(str(p) for p in digits_folder.rglob("*.png"))[::4]
    t = Predictor.load(dest, backend="torch").predict_paths(paths, include_probs=True)
    o = Predictor.load(dest, backend="onnx", precision="fp32").predict_paths(
        paths, include_probs=True, batch_size=7)
    assert o["meta"]["backend"] == "onnx" and o["meta"]["precision"] == "fp32"
    pt = np.array([list(r["probs"].values()) for r in t["results"]])
    po = np.array([list(r["probs"].values()) for r in o["results"]])
    assert pt.shape == (len(paths), 10)
    assert np.abs(pt - po).max() <= 1e-4
    assert [r["class"] for r in t["results"]] == [r["class"] for r in o["results"]]


def test_static_int8_is_judged_on_held_out_images(exported, digits_folder):
    dest, res, lines = exported
    q = res.quant
    # one folder: 40 images calibrate, the other 260 are held out for the check
    assert q.mode == "static" and (q.n_calib, q.n_images) == (40, 260)
    assert q.accuracy_fp32 is not None and q.accuracy_int8 is not None  # class folders
    assert q.agreement >= 0.8 and q.max_abs_dprob < 0.5
    assert any("held-out" in line and "accuracy fp32" in line and "->" in line
               for line in lines)
    m = load_bundle(dest).manifest["onnx"]
    assert m["precision"] == res.precision == ("int8" if q.accepted else "fp32")
    assert ("accepted" if q.accepted else "refused") in m["int8"]
    p = Predictor.load(dest)  # auto: ONNX Runtime at the precision the check allowed
    assert (p.backend.name, p.backend.precision) == ("onnx", res.precision)
    forced = Predictor.load(dest, precision="int8")
    paths = sorted(str(p) for p in (digits_folder / "d2").glob("*.png"))
    classes = [r["class"] for r in forced.predict_paths(paths)["results"]]
    ref = [r["class"] for r in Predictor.load(dest, backend="torch").predict_paths(paths)[
        "results"]]
    assert np.mean(np.array(classes) == np.array(ref)) >= 0.8


def _graph_of(model_or_none, bundle):
    """fp32 graph bytes of a bundle's own model, or of a differently initialised one."""
    from imgtriage.models import create_model
    from imgtriage.predict.backends import build_model
    from imgtriage.predict.graph import export_graph

    b = load_bundle(bundle)
    if model_or_none == "own":
        model = build_model(b)
    else:
        import torch

        torch.manual_seed(123)
        model = create_model("crop_cnn", 10, 1)
    return export_graph(model.eval(), b.info, None).data


@pytest.mark.parametrize("quantised_as", ["disagreeing", "identical"])
def test_int8_becomes_the_default_only_when_proven(tiny_run, tmp_path, monkeypatch,
                                                   quantised_as):
    from imgtriage.predict import int8

    dest = shutil.copytree(tiny_run.bundle_path, tmp_path / "b")
    # the "int8" graph: another model (disagrees) or fp32 itself (cannot disagree)
    fake = _graph_of("other" if quantised_as == "disagreeing" else "own", dest)
    monkeypatch.setattr(int8, "_quantize", lambda *_a: fake)
    lines: list[str] = []
    res = export_onnx(dest, quantize="static", calib=tiny_run.run_dir / "splits.csv",
                      log=lines.append)
    q, m = res.quant, load_bundle(dest).manifest["onnx"]
    assert q.n_images == 40  # the val rows of splits.csv, never the train rows
    p = Predictor.load(dest)
    if quantised_as == "disagreeing":
        assert not q.accepted and q.agreement < 0.99 and "agreement" in q.reason
        assert res.precision == m["precision"] == "fp32" and m["int8"]["refused"] == q.reason
        assert p.runtime.precision == "fp32" and "int8 refused" in p.runtime.note
        assert any("fp32 kept" in line for line in lines)
        assert Predictor.load(dest, precision="int8").runtime.precision == "int8"  # if asked
    else:
        assert q.accepted and q.agreement == 1.0 and q.accuracy_fp32 == q.accuracy_int8
        assert res.precision == m["precision"] == "int8" and "accepted" in m["int8"]
        assert p.runtime.precision == "int8" and "int8 accepted" in p.runtime.note


def test_the_rule_needs_labels_enough_images_and_both_bounds():
    from imgtriage.predict.int8 import judge

    ok, why = judge(1.0, 0.9, 0.9, 29)  # too few held-out images to prove anything
    assert not ok and "30" in why
    assert not judge(1.0, None, None, 500)[0]
    assert judge(0.99, 0.900, 0.895, 500)[0]  # exactly at both bounds
    assert not judge(0.989, 0.90, 0.90, 500)[0]
    assert not judge(0.995, 0.900, 0.894, 500)[0]  # 0.6 points
    ok, why = judge(1.0, 0.90, 0.90, 500, decisions=0.984)  # same classes, other abstentions
    assert not ok and "default rule decides differently" in why and "1.6%" in why
    ok, why = judge(1.0, 0.90, 0.90, 500, decisions=0.992)
    assert ok and "same default decision on 99.2%" in why


def test_the_disagreement_bound_says_how_strong_the_evidence_was():
    from imgtriage.predict.int8 import disagreement_upper

    rng = np.random.default_rng(0)  # the bound covers the true rate >= 95% of the time
    rate, n = 0.02, 200
    seen = rng.binomial(n, rate, size=2000)
    covered = np.mean([disagreement_upper(int(k), n) >= rate for k in seen])
    assert 0.95 <= covered < 0.995
    assert 0.09 < disagreement_upper(0, 30) < 0.1  # ~ the rule of three, 3 / n
    assert disagreement_upper(0, 1000) < disagreement_upper(0, 100) < disagreement_upper(0, 30)
    assert disagreement_upper(5, 1000) > 5 / 1000 and disagreement_upper(3, 3) == 1.0


def test_dynamic_int8_warns_that_it_is_slower_for_cnns(tiny_bundle, tmp_path, digits_folder):
    dest = shutil.copytree(tiny_bundle, tmp_path / "b")
    with pytest.warns(UserWarning, match="SLOWER"):
        res = export_onnx(dest, quantize="dynamic", calib=digits_folder / "d0",
                          calib_images=8)
    assert res.quant.mode == "dynamic" and res.quant.accuracy_fp32 is not None
    assert load_bundle(dest).manifest["onnx"]["int8"]["mode"] == "dynamic"


def test_export_errors_say_what_to_pass(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="--calib"):
        export_onnx(tiny_bundle, quantize="static")
    with pytest.raises(ConfigError, match="--quantize"):
        export_onnx(tiny_bundle, quantize="int4", calib=tmp_path)
    with pytest.raises(ConfigError, match="--calib"):
        export_onnx(tiny_bundle, quantize="static", calib=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--check-images"):
        export_onnx(tiny_bundle, quantize="static", calib=tmp_path, check_images=0)
    with pytest.raises(ConfigError, match="export"):
        Predictor.load(without_graph(tiny_bundle, tmp_path / "nograph"), backend="onnx")
    with pytest.raises(ConfigError, match="--precision"):
        Predictor.load(tiny_bundle, backend="torch", precision="int8")


def test_fp32_re_export_keeps_the_int8_graph_and_its_verdict(exported, tmp_path):
    dest, _, _ = exported
    assert load_bundle(dest).manifest["onnx"]["int8"]["accepted"]
    copy = shutil.copytree(dest, tmp_path / "again")
    res = export_onnx(copy)  # same weights: the accepted int8 graph stays the default
    m = load_bundle(copy).manifest
    assert m["bundle_version"] == 3 and res.precision == "int8" and res.quant is None
    assert m["onnx"]["int8"]["file"] == "model.int8.onnx" and m["onnx"]["precision"] == "int8"
    assert Predictor.load(copy).backend.precision == "int8"
    assert Predictor.load(copy, precision="fp32").backend.precision == "fp32"
