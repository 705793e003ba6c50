"""The graph module: named outputs, so a second output (e.g. features) is one registry entry."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.bundle import load_bundle, save_bundle
from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor
from imgtriage.predict.backends import build_model
from imgtriage.predict.graph import export_graph
from imgtriage.predict.ort_session import run_graph

pytest.importorskip("onnxruntime")


def test_a_second_output_rides_along_and_logits_stay_first(tiny_bundle, monkeypatch, tmp_path):
    b = load_bundle(tiny_bundle)
    model = build_model(b)
    tapped = build_model(b, with_features=True)  # (logits, penultimate features)
    x = np.random.default_rng(1).standard_normal((5, 1, 32, 32)).astype(np.float32)
    g = export_graph(tapped, b.info, x, outputs=("logits", "features"))
    assert g.info["outputs"] == ["logits", "features"] and g.info["parity_images"] == 5
    import torch

    with torch.inference_mode():
        feats = model.forward_features(torch.from_numpy(x)).numpy()
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_graph(g.data, x, output="features"), feats, atol=1e-4)
    np.testing.assert_allclose(run_graph(g.data, x), logits, atol=1e-4)
    # a bundle holding the two-output graph still predicts from its logits
    two = save_bundle(tmp_path / "two", {**b.manifest, "onnx": g.info}, b.state_dict(),
                      {"model.onnx": g.data})
    p = Predictor.load(two)
    assert p.runtime.backend == "onnx"
    np.testing.assert_allclose(p.logits(x), logits, atol=1e-4)


def test_outputs_must_start_with_logits_and_be_known(tiny_bundle):
    b = load_bundle(tiny_bundle)
    for outputs in (("features",), ("logits", "nope"), ()):
        with pytest.raises(ConfigError, match="logits"):
            export_graph(build_model(b), b.info, None, outputs=outputs)
