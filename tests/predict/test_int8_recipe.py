"""The static int8 recipe: the stem, the classifier and the graph outputs stay fp32, and the
logits it gives are closer to fp32 than quantising every layer."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.bundle import load_bundle
from imgtriage.data import PreprocessSpec, load_input

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def graphs(tiny_bundle, digits_folder):
    """(fp32 graph, int8 graph, calibration inputs, held-out inputs) of the tiny bundle."""
    from imgtriage.predict.int8 import _quantize

    b = load_bundle(tiny_bundle)
    spec = PreprocessSpec.from_dict(dict(b.info.preprocess))
    paths = sorted(digits_folder.rglob("*.png"))
    x = np.stack([load_input(p, spec)[0] for p in paths])
    calib, check = x[::5], np.delete(x, np.s_[::5], axis=0)
    fp32 = b.verified_bytes("model.onnx")
    return fp32, _quantize(fp32, "static", calib), calib, check


def _nodes(graph: bytes):
    m = onnx.load_from_string(graph)
    return m, {o: n for n in m.graph.node for o in n.output}


def test_stem_classifier_and_outputs_stay_float(graphs):
    _, q, _, _ = graphs
    m, producer = _nodes(q)
    inits = {t.name for t in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    stem, inner = convs[0], convs[1:]
    assert stem.input[0] == m.graph.input[0].name  # reads the image itself, in fp32
    assert stem.input[1] in inits  # float weights
    after = [n for n in m.graph.node if stem.output[0] in n.input]
    while len(after) == 1 and after[0].op_type in ("Relu", "MaxPool"):  # the stem's block
        after = [n for n in m.graph.node if after[0].output[0] in n.input]
    assert after and after[0].op_type == "QuantizeLinear"  # quantised once, after its pool
    assert inner and all(producer[n.input[1]].op_type == "DequantizeLinear" for n in inner)
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in inner)
    head = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert head and all(n.input[1] in inits for n in head)
    for out in m.graph.output:  # no Quantize/Dequantize rounding on what the graph returns
        assert producer[out.name].op_type != "DequantizeLinear"
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) >= len(inner)


def test_logits_are_closer_to_fp32_than_quantising_every_layer(graphs):
    from imgtriage.predict.int8 import _quantize
    from imgtriage.predict.ort_session import run_graph

    fp32, q, calib, check = graphs
    z32 = run_graph(fp32, check)
    err = np.abs(run_graph(q, check) - z32).mean()
    every_layer = _quantize(fp32, "static", calib, keep_fp32=())  # the former recipe
    err_all = np.abs(run_graph(every_layer, check) - z32).mean()
    assert 0 < err < err_all
    assert (run_graph(q, check).argmax(1) == z32.argmax(1)).mean() >= 0.97


def test_float_outputs_turns_only_output_pairs_into_identities(graphs):
    from imgtriage.predict.int8 import float_outputs

    fp32, q, _, _ = graphs
    assert float_outputs(fp32) == fp32  # nothing quantised: unchanged
    again = float_outputs(q)
    assert sum(n.op_type == "Identity" for n in _nodes(again)[0].graph.node) == sum(
        n.op_type == "Identity" for n in _nodes(q)[0].graph.node)  # idempotent


def test_the_verdict_names_the_recipe(graphs):
    from imgtriage.predict.int8 import STATIC_RECIPE, LabelledInputs, quantize_checked

    fp32, _, calib, check = graphs
    _, verdict = quantize_checked(fp32, "static", calib, LabelledInputs(check, None))
    assert verdict.recipe == STATIC_RECIPE
    assert verdict.manifest_block(b"")["recipe"] == STATIC_RECIPE


def test_the_features_branch_stays_float_and_keeps_the_stage_statistics(tiny_bundle, graphs):
    """The trained model with its stage statistics in the features output (the OOD scorer's
    input): the nodes the logits do not depend on are not quantised, and the statistics come
    out of the int8 graph closer to fp32 than when that branch is quantised too."""
    from imgtriage.models import WithFeatures
    from imgtriage.predict.backends import build_model
    from imgtriage.predict.graph import export_graph
    from imgtriage.predict.int8 import _quantize
    from imgtriage.predict.ort_session import run_outputs

    _, _, calib, check = graphs
    b = load_bundle(tiny_bundle)
    tap = WithFeatures(build_model(b), stages=True).eval()
    fp32 = export_graph(tap, b.info, check[:16], outputs=("logits", "features")).data
    width = sum(tap.stage_widths)
    assert width > 0
    q = _quantize(fp32, "static", calib)
    m, producer = _nodes(q)
    # past the stage maps themselves (read as the next layer reads them), nothing on the
    # statistics' way to the features output is rounded to 8 bits
    inner = [n for n in m.graph.node if n.op_type in ("Mul", "Sqrt", "Log", "Sign", "Abs")]
    assert inner and all(producer[i].op_type != "DequantizeLinear"
                         for n in inner for i in n.input if i in producer)
    f32 = run_outputs(fp32, check, ("features",))[0][:, -width:]
    err = np.abs(run_outputs(q, check, ("features",))[0][:, -width:] - f32).mean()
    quantised = _quantize(fp32, "static", calib, keep_fp32=("stem", "classifier", "outputs"))
    err_q = np.abs(run_outputs(quantised, check, ("features",))[0][:, -width:] - f32).mean()
    assert err < 0.5 * err_q
