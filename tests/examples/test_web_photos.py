"""The web-photos recipe (examples/web-photos), reduced: few photos, one epoch, a real service.

It runs the recipe's own ``main`` and checks that its outputs exist and agree: every test photo
answered once, metrics in range, the bundle loads with its ONNX graph and decision rule, and the
service's answers equal the Predictor's on the same bytes (JSON and multipart).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from shared_helpers import REPO, shared_dataset

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def load_recipe():
    spec = importlib.util.spec_from_file_location("web_photos_run",
                                                  REPO / "examples" / "web-photos" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    data = shared_dataset("cifar10-small")
    out = tmp_path_factory.mktemp("web-photos")
    summary = load_recipe().main(["--data", str(data), "--out", str(out), "--per-class", "40",
                                  "--test-per-class", "8", "--epochs", "1",
                                  "--classes", "ship,cat,automobile", "--threads", "1",
                                  "--request-size", "5", "--latency-requests", "3"])
    return out, summary


def test_every_test_photo_is_answered_once(recipe):
    out, s = recipe
    assert s["counts"] == {"pool": 120, "test": 24}
    assert s["service"]["n"] == s["service"]["results"] == 24 and s["service"]["defects"] == 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert sum(v["support"] for v in s["service"]["per_class"].values()) == 24


def test_metrics_are_in_range(recipe):
    _, s = recipe
    sv = s["service"]
    for v in (sv["accuracy"], sv["coverage"], s["evaluate"]["accuracy"]):
        assert 0.0 <= v <= 1.0
    assert sv["accuracy_at_coverage"] is None or 0.0 <= sv["accuracy_at_coverage"] <= 1.0
    for v in sv["per_class"].values():
        assert 0.0 <= v["recall"] <= 1.0 and 0 <= v["abstained"] <= v["support"]
    # the same ONNX graph over the same files (evaluate batches differently: allow one tie)
    assert math.isclose(sv["accuracy"], s["evaluate"]["accuracy"], abs_tol=1 / 24 + 1e-9)
    assert all(f > 0 for k, f in s["files_per_second"].items() if k != "request_size")


def test_bundle_loads_with_onnx_graph_and_decision_rule(recipe):
    from imgtriage.bundle import load_bundle

    out, s = recipe
    b = load_bundle(out / "run" / "bundle")  # verifies hashes
    assert b.classes == ["automobile", "cat", "ship"] == s["classes"]
    assert (out / "run" / "bundle" / "model.onnx").is_file()
    assert b.manifest["decision"]["abstain"] is True
    assert len(b.manifest["decision"]["thresholds"]) == 3
    assert s["served_backend"] == "onnx" and s["bundle_sha256"] == b.sha256
    assert (out / "eval" / "report.html").stat().st_size > 0
    assert s["web_page"]["status"] == 200 and s["web_page"]["has_drop_zone"]
    assert s["web_page"]["type"].startswith("text/html")


def test_service_answers_equal_the_predictor_on_the_same_bytes(recipe):
    _, s = recipe
    p = s["parity"]
    assert p["rows"] == 24
    assert p["auto"]["backend"] == "onnx"
    assert p["auto"]["identical_to_json"] and p["auto"]["identical_to_multipart"]
    assert p["torch"]["max_abs_prob_diff"] < 1e-4  # the torch weights give the same answer


def test_client_script_sends_both_encodings(recipe, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "web_photos_client", REPO / "examples" / "web-photos" / "photo_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    body, ctype = client.multipart_body([b"\x89PNG", b"GIF8"], ['a".png', "b.gif"])
    boundary = ctype.split("boundary=")[1]
    assert body.count(f"--{boundary}\r\n".encode()) == 2
    assert body.endswith(f"--{boundary}--\r\n".encode())
    assert b'filename="a%22.png"' in body and b"Content-Type: image/gif" in body
    assert Path(client.__file__).name == "photo_client.py"
