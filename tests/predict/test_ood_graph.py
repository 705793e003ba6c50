"""The OOD score inside the ONNX graph: the same score as the NumPy scorer, for every graph a
bundle runs (fp32, int8), and the NumPy path kept for older bundles and changed rules."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from imgtriage.bundle import load_bundle, update_bundle
from imgtriage.bundle.graph import ONNX_FILE
from imgtriage.errors import BundleError
from imgtriage.evaluate.ood import KnnOOD, KnnRmdOOD, KnnRmdStagesOOD
from imgtriage.predict import Predictor
from imgtriage.predict.ood_graph import add_ood_score, without_ood_score

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _toy_graph(dim: int, opset: int) -> bytes:
    """input (N, 6) -> features = relu(x A) (N, dim) -> logits = features B (N, 3)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = numpy_helper.from_array(rng.normal(size=(6, dim)).astype(np.float32), "A")
    b = numpy_helper.from_array(rng.normal(size=(dim, 3)).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["input", "A"], ["h"]),
             helper.make_node("Relu", ["h"], ["features"]),
             helper.make_node("MatMul", ["features", "B"], ["logits"])]
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["batch", 6])], [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])], [a, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def _run(graph: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, {"input": x}), strict=True))


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("cls", [KnnOOD, KnnRmdOOD, KnnRmdStagesOOD])
def test_in_graph_score_equals_the_numpy_scorer(cls, opset):
    rng = np.random.default_rng(1)
    graph = _toy_graph(16, opset)
    x_train = rng.normal(size=(400, 6)).astype(np.float32)
    feats = _run(graph, x_train)["features"]
    y = np.argmax(_run(graph, x_train)["logits"], 1)
    # knn+rmd+stages: the last 6 feature columns play two stages' statistics (4 and 2 wide)
    extra = {"stage_widths": [4, 2]} if cls is KnnRmdStagesOOD else {}
    scorer = cls(k=5, max_bank=300, **extra).fit(feats[:300], feats[300:], train_labels=y[:300])
    scored = add_ood_score(graph, scorer)
    # rows like the training ones, shifted rows, and rows whose features are all zero
    x = np.concatenate([rng.normal(size=(40, 6)), rng.normal(size=(20, 6)) + 3,
                        np.zeros((1, 6))]).astype(np.float32)
    out = _run(scored, x)
    np.testing.assert_allclose(out["ood_score"], scorer.score(out["features"]), atol=1e-4)
    np.testing.assert_array_equal(out["logits"], _run(graph, x)["logits"])  # model untouched
    stripped = without_ood_score(scored)  # what a run without the score uses
    assert onnx.load_from_string(stripped).graph == onnx.load_from_string(graph).graph


def test_a_graph_without_features_or_already_scored_is_refused():
    rng = np.random.default_rng(2)
    graph = _toy_graph(8, 17)
    scorer = KnnOOD(k=3).fit(rng.normal(size=(50, 8)), rng.normal(size=(20, 8)))
    scored = add_ood_score(graph, scorer)
    with pytest.raises(BundleError, match="already has"):
        add_ood_score(scored, scorer)
    proto = onnx.load_from_string(graph)
    del proto.graph.output[1]  # logits only
    with pytest.raises(BundleError, match="no 'features' output"):
        add_ood_score(proto.SerializeToString(), scorer)


def _scores(bundle, x, backend="onnx", **kw):
    p = Predictor.load(bundle, backend=backend, num_threads=1, **kw)
    return p, p.forward(x, p.policy)[1]


@pytest.fixture(scope="module")
def inputs(calibrated_run, digits_folder):
    p = Predictor.load(calibrated_run.bundle_path, num_threads=1)
    rng = np.random.default_rng(4)
    real = [d.x for d in p.decode_bytes([f.read_bytes() for f in sorted(
        digits_folder.glob("*/*.png"))[::10]])]
    noise = rng.normal(size=(5, *real[0].shape)).astype(np.float32) * 3
    return np.concatenate([np.stack(real), noise])


def test_a_trained_bundle_scores_inside_its_graph(calibrated_run, inputs):
    b = load_bundle(calibrated_run.bundle_path)
    info = b.manifest["onnx"]
    assert info["outputs"] == ["logits", "features", "ood_score"]
    rec = info["ood_score"]
    # both graphs a trained bundle carries: fp32 and its int8 default (accepted when trained)
    assert rec["parity_max_abs"] < 1e-3 and rec["graphs"] == [ONNX_FILE, "model.int8.onnx"]
    assert rec["sha256"] == b.manifest["files"]["ood.safetensors"]
    p, graph = _scores(b.path, inputs, precision="fp32")  # parity with torch: fp32, asked for
    assert p.graph_scores(p.policy.ood) and p.backend._plain is None
    logits = p.backend(inputs)  # a logits-only run: the same graph less its head
    assert p.backend._plain is not None
    np.testing.assert_array_equal(logits, p.backend.with_ood_score(inputs)[0])
    _, feats = p.backend.with_features(inputs)
    np.testing.assert_allclose(graph, p.ood_scorer(p.policy.ood).score(feats), rtol=1e-5,
                               atol=1e-4)
    t, torch_scores = _scores(b.path, inputs, backend="torch")
    assert not t.graph_scores(t.policy.ood)
    # the noise rows score 1e3-1e5 (stage statistics far from training): float32 keeps ~7 digits
    np.testing.assert_allclose(graph, torch_scores, atol=1e-3, rtol=1e-5)
    thr = p.policy.ood["threshold"]
    clear = np.abs(torch_scores - thr) > 1e-3  # same refusals wherever not on the threshold
    assert clear.sum() >= len(inputs) - 1
    np.testing.assert_array_equal((graph > thr)[clear], (torch_scores > thr)[clear])


def test_older_bundles_and_changed_rules_score_the_features_in_numpy(calibrated_run, inputs,
                                                                     tmp_path):
    from imgtriage.predict.backends import build_model
    from imgtriage.predict.graph import export_graph

    src = load_bundle(calibrated_run.bundle_path)
    _, in_graph = _scores(src.path, inputs, precision="fp32")  # the same graph in each case
    # a bundle written before in-graph scores: logits + features only, no record
    old = export_graph(build_model(src, with_features=True), src.info, inputs[:4],
                       outputs=("logits", "features"))
    dest = update_bundle(shutil.copytree(src.path, tmp_path / "old"), {"onnx": old.info},
                         note="graph without the OOD head", extra_files={ONNX_FILE: old.data})
    p, numpy_scores = _scores(dest.path, inputs)
    assert not p.backend.has_ood_score and not p.graph_scores(p.policy.ood)
    np.testing.assert_allclose(numpy_scores, in_graph, rtol=1e-5, atol=1e-4)
    # the rule's scale edited after training: the graph's head no longer matches it
    rule = dict(src.manifest["decision"]["ood"])
    rule["scale"] = {**rule["scale"], "knn": [0.0, 1.0], "rmd": [0.0, 1.0]}
    edited = update_bundle(shutil.copytree(src.path, tmp_path / "edited"), {"decision": {
        **src.manifest["decision"], "ood": rule}}, note="scale edited")
    p, scores = _scores(edited.path, inputs, precision="fp32")
    assert p.backend.has_ood_score and not p.graph_scores(p.policy.ood)
    assert not np.allclose(scores, in_graph, atol=1e-2)
    _, feats = p.backend.with_features(inputs)
    np.testing.assert_allclose(scores, p.ood_scorer(rule).score(feats))


def test_export_puts_the_score_into_the_int8_graph_it_runs(calibrated_run, digits_folder,
                                                           inputs, tmp_path):
    from imgtriage.predict.export import export_onnx

    dest = shutil.copytree(calibrated_run.bundle_path, tmp_path / "b")
    export_onnx(dest, quantize="static", calib=digits_folder, calib_images=40)
    info = load_bundle(dest).manifest["onnx"]
    assert info["ood_score"]["graphs"] == ["model.onnx", "model.int8.onnx"]
    for precision in ("fp32", "int8"):
        p, scores = _scores(dest, inputs, precision=precision)
        assert p.backend.precision == precision and p.graph_scores(p.policy.ood)
        _, feats = p.backend.with_features(inputs)  # this graph's own features
        np.testing.assert_allclose(scores, p.ood_scorer(p.policy.ood).score(feats),
                                   rtol=1e-5, atol=1e-4)
