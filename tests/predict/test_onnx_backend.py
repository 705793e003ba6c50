"""The ONNX Runtime backend: thread layout, split sessions, auto selection."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from imgtriage.bundle import load_bundle
from imgtriage.errors import BundleIntegrityError, ConfigError
from imgtriage.predict import Predictor
from imgtriage.predict.export import export_onnx
from shared_helpers import without_graph

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with only an fp32 graph, written by `imgtriage export` (no int8)."""
    dest = without_graph(tiny_bundle, tmp_path_factory.mktemp("onnx") / "b")
    export_onnx(dest)
    return dest


def test_split_single_thread_sessions_answer_like_one_session(onnx_bundle):
    from imgtriage.predict.onnx_backend import OnnxBackend

    b = load_bundle(onnx_bundle)
    split = OnnxBackend(b, num_threads=2, sessions="auto")  # a small graph: one per thread
    one = OnnxBackend(b, num_threads=2, sessions=1)
    assert split.num_sessions == 2 and one.num_sessions == 1
    assert OnnxBackend(b, num_threads=1).num_sessions == 1
    x = np.random.default_rng(0).standard_normal((9, 1, 32, 32)).astype(np.float32)
    for n in (1, 3, 9):  # below and above the split size
        np.testing.assert_allclose(split(x[:n]), one(x[:n]), atol=1e-5)
    assert split.batch_size == 64  # small graphs take bigger batches
    with pytest.raises(ConfigError, match="sessions"):
        OnnxBackend(b, sessions=0)


def test_auto_picks_onnx_on_cpu_and_torch_elsewhere_by_request(onnx_bundle):
    assert Predictor.load(onnx_bundle).backend.name == "onnx"
    assert Predictor.load(onnx_bundle, backend="torch").backend.name == "torch"
    with pytest.raises(ConfigError, match="--backend"):
        Predictor.load(onnx_bundle, backend="tensorrt")
    with pytest.raises(ConfigError, match="int8"):
        Predictor.load(onnx_bundle, precision="int8")  # never exported


def test_a_tampered_graph_is_refused(onnx_bundle, tmp_path):
    bad = shutil.copytree(onnx_bundle, tmp_path / "bad")
    g = bad / "model.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF
    g.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx"):
        Predictor.load(bad)


@pytest.mark.parametrize("which", ["tiny_bundle", "calibrated_run"])
def test_the_onnx_predict_path_never_imports_torch(which, request, digits_folder, tmp_path):
    """Start-up: `imgtriage predict` on an ONNX bundle loads no torch (python -X importtime),
    also with the default rule's OOD scorer (the calibrated bundle)."""
    import subprocess
    import sys

    bundle = request.getfixturevalue(which)
    bundle = getattr(bundle, "bundle_path", bundle)
    png = sorted((digits_folder / "d4").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "imgtriage", "predict",
                           str(bundle), str(png), "--output", str(tmp_path / "r.json"),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    precision = load_bundle(bundle).manifest["onnx"]["precision"]  # int8 where accepted
    assert proc.stdout.startswith(f"predict: backend onnx, precision {precision}")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "imgtriage.predict.onnx_backend" in imported
    assert any(m.startswith("onnxruntime") for m in imported)
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
