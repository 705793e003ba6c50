"""A bundle written before the typed manifest (schema version 1, committed under
tests/bundle/data/v1_classifier, made with main at d35d316) still loads and answers the same.

The fixture is a random-init crop_cnn (widths 4, 8) on 16x16 grayscale with two classes and a
second version carrying a 'strict' profile; the expected logits of three ramps were recorded
with that code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from imgtriage.bundle import Manifest, load_bundle
from imgtriage.errors import BundleIntegrityError
from imgtriage.predict import Predictor

V1 = Path(__file__).parent / "data" / "v1_classifier"
_RAMP = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
ARRAYS = [_RAMP, _RAMP.T.copy(), 255 - _RAMP]
LOGITS = np.array([[0.05469299852848053, 0.0628342553973198],
                   [0.13758723437786102, 0.06636924296617508],
                   [0.039341092109680176, -0.02562221884727478]])


def test_v1_bundle_loads_verified_with_its_history():
    b = load_bundle(V1)
    assert b.classes == ["dark", "bright"]
    assert b.manifest["bundle_version"] == 2 and len(b.manifest["history"]) == 1
    assert "strict" in b.manifest["profiles"]


def test_v1_bundle_answers_as_when_it_was_made():
    p = Predictor.load(V1, backend="torch")
    x = np.stack([p.decoder.from_array(a, f"a{i}").x for i, a in enumerate(ARRAYS)])
    np.testing.assert_allclose(p.logits(x), LOGITS, atol=1e-5)
    rows = p.predict_arrays(ARRAYS, include_probs=True)
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    assert [r["class"] for r in rows] == ["bright", "dark", "dark"]
    for row, want in zip(rows, probs, strict=True):
        assert not row["abstained"]
        np.testing.assert_allclose([row["probs"]["dark"], row["probs"]["bright"]], want,
                                   atol=1e-5)
    strict = p.predict_arrays(ARRAYS, profile="strict")
    assert all(r["abstained"] and r["class"] == "unknown" for r in strict)


def test_a_modified_v1_file_is_still_refused(tmp_path):
    copy = Path(shutil.copytree(V1, tmp_path / "b"))
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"weights\.safetensors"):
        load_bundle(copy)


def test_the_typed_manifest_reads_the_v1_bundle_and_fills_old_writers_gaps():
    info = load_bundle(V1).info
    assert (info.schema_version, info.kind, info.bundle_version) == (1, "classifier", 2)
    assert info.model.name == "crop_cnn" and dict(info.model.kwargs) == {"widths": [4, 8]}
    assert info.classes == ("dark", "bright") and info.tta == ("hflip",)
    assert [h.version for h in info.history] == [1] and set(info.profiles) == {"strict"}
    raw = dict(load_bundle(V1).manifest)
    for key in ("kind", "bundle_version", "profiles", "history", "tta"):  # an early v1 writer
        raw.pop(key)
    old = Manifest.from_dict(raw)
    assert (old.kind, old.bundle_version, old.profiles, old.history, old.tta) == \
        ("classifier", 1, {}, (), None)
    assert old.model == info.model and old.block("cascade") is None
