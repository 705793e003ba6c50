"""ONNX export: a new bundle version, torch/ONNX parity, int8 with a printed check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from imgtriage.bundle import load_bundle
from imgtriage.bundle.export import export_onnx
from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor
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


def test_static_int8_prints_its_agreement_and_accuracy(exported, digits_folder):
    dest, res, lines = exported
    q = res.quant
    assert q.mode == "static" and q.n_images == 40
    assert q.accuracy_fp32 is not None and q.accuracy_int8 is not None  # class folders
    assert q.agreement >= 0.9 and q.max_abs_dprob < 0.2
    assert any("top-1 agreement" in line and "accuracy fp32" in line for line in lines)
    p = Predictor.load(dest)  # auto: ONNX Runtime, int8 as the export chose
    assert (p.backend.name, p.backend.precision) == ("onnx", "int8")
    paths = sorted(str(p) for p in (digits_folder / "d2").glob("*.png"))
    classes = [r["class"] for r in p.predict_paths(paths)["results"]]
    ref = [r["class"] for r in Predictor.load(dest, backend="torch").predict_paths(paths)[
        "results"]]
    assert np.mean(np.array(classes) == np.array(ref)) >= 0.8


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
    with pytest.raises(ConfigError, match="export"):
        Predictor.load(without_graph(tiny_bundle, tmp_path / "nograph"), backend="onnx")
    with pytest.raises(ConfigError, match="--precision"):
        Predictor.load(tiny_bundle, backend="torch", precision="int8")


def test_fp32_re_export_keeps_the_int8_graph(exported, tmp_path):
    dest, _, _ = exported
    copy = shutil.copytree(dest, tmp_path / "again")
    res = export_onnx(copy)
    m = load_bundle(copy).manifest
    assert m["bundle_version"] == 3 and res.precision == "fp32" and res.quant is None
    assert m["onnx"]["int8"]["file"] == "model.int8.onnx"
    assert Predictor.load(copy, precision="int8").backend.precision == "int8"
    assert Predictor.load(copy).backend.precision == "fp32"
