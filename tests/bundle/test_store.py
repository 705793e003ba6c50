import json
import shutil
import zipfile

import numpy as np
import pytest

from imgtriage.bundle import load_bundle, save_bundle, update_bundle
from imgtriage.errors import (
    BundleIntegrityError,
    BundleMissingFileError,
    BundleSchemaError,
)
from imgtriage.predict import Predictor


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


def _probs(bundle, folder):
    report = Predictor.load(bundle).predict_paths([folder], include_probs=True)
    return {r["path"]: [r["probs"][c] for c in report["meta"]["classes"]]
            for r in report["results"]}


def test_manifest_describes_everything_that_decides_an_answer(tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    assert m["schema_version"] == 1 and m["model"]["name"] == "crop_cnn"
    assert m["classes"] == [f"d{i}" for i in range(10)]
    for key in ("in_chans", "size", "scaling", "stretch", "resize", "interpolation", "mean",
                "std", "read"):
        assert key in m["preprocess"]
    assert set(m["decision"]) >= {"temperature", "thresholds", "abstain", "unknown_label"}
    assert {"imgtriage", "torch", "numpy", "python"} <= set(m["versions"])
    assert m["training"]["config"]["epochs"] == 3
    # the graphs from the start: fp32, and int8 (the default: its held-out check accepted it)
    assert list(m["files"]) == ["model.int8.onnx", "model.onnx", "train_digests.safetensors",
                                "weights.safetensors"]
    assert m["onnx"]["precision"] == "int8" and m["onnx"]["int8"]["accepted"]
    assert len(m["files"]["weights.safetensors"]) == 64
    assert 0 <= m["metrics"]["val_accuracy"] <= 1


def test_saved_and_reloaded_bundle_gives_identical_probabilities(bundle_copy, digits_folder,
                                                                 tmp_path):
    b = load_bundle(bundle_copy)
    graph = {n: b.verified_bytes(n) for n in ("model.onnx", "model.int8.onnx")}
    again = save_bundle(tmp_path / "again", b.manifest, b.state_dict(), graph)
    zipped = save_bundle(tmp_path / "again.zip", b.manifest, b.state_dict(), graph)
    folder = digits_folder / "d3"
    p0, p1, p2 = (_probs(x, folder) for x in (bundle_copy, again, zipped))
    assert p0 == p1 == p2
    total = np.array(list(p0.values())).sum(axis=1)
    assert np.allclose(total, 1.0, atol=1e-4)


def test_tampered_weights_are_refused(bundle_copy):
    w = bundle_copy / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleIntegrityError):
        Predictor.load(bundle_copy)


def test_unknown_schema_version_and_missing_files(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleSchemaError, match="schema version 99"):
        load_bundle(bundle_copy)
    m["schema_version"] = 1
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    (bundle_copy / "weights.safetensors").unlink()
    with pytest.raises(BundleMissingFileError, match="missing"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleMissingFileError, match="does not exist"):
        load_bundle(bundle_copy.parent / "nothing")


def test_not_a_bundle(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(BundleSchemaError, match="not an imgtriage bundle"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(BundleSchemaError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_a_training_run_directory_is_answered_with_its_bundle_path(bundle_copy, tmp_path):
    shutil.copytree(bundle_copy, tmp_path / "run" / "bundle")
    with pytest.raises(BundleMissingFileError, match=r"training run directory: pass its "
                                                     r"bundle, .*run/bundle"):
        load_bundle(tmp_path / "run")
    (tmp_path / "data").mkdir()
    with pytest.raises(BundleMissingFileError, match="writes RUN/bundle"):
        load_bundle(tmp_path / "data")


def test_no_pickle_in_a_bundle(bundle_copy, tmp_path):
    save_bundle(tmp_path / "b.zip", load_bundle(bundle_copy).manifest,
                load_bundle(bundle_copy).state_dict())
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        names = zf.namelist()
        blobs = [zf.read(n) for n in names]
    assert sorted(names) == ["manifest.json", "weights.safetensors"]
    assert not any(b.startswith(b"\x80") or b"PK\x03\x04" in b[:4] for b in blobs)


def test_update_keeps_history_and_changes_decisions(bundle_copy, digits_folder):
    new = update_bundle(bundle_copy, {"decision": {"temperature": 2.0, "thresholds": None,
                                                   "abstain": False}}, note="calibrate")
    assert new.manifest["bundle_version"] == 2
    assert new.manifest["history"] == [{"version": 1, "note": "calibrate"}]
    old = json.loads(new.read_bytes("history/manifest.v1.json"))
    assert old["decision"]["temperature"] == 1.0
    report = Predictor.load(bundle_copy).predict_paths([digits_folder / "d1"])
    assert report["meta"]["temperature"] == 2.0


def test_safetensors_whose_header_length_starts_with_0x80_is_not_called_a_pickle():
    import struct

    from safetensors.numpy import load, save

    from imgtriage.bundle.checks import check_safetensors
    from imgtriage.errors import BundleIntegrityError

    for pad in range(0, 300):  # find arrays whose JSON header is 128 + 256k bytes long
        data = save({"bank": np.zeros((2, 3), np.float32), "x" * (pad + 1): np.zeros(1)})
        if data[0] == 0x80:
            break
    assert struct.unpack("<Q", data[:8])[0] % 256 == 0x80
    check_safetensors(data, "ood.safetensors", "b")  # accepted
    assert load(data)["bank"].shape == (2, 3)
    with pytest.raises(BundleIntegrityError, match="pickle"):
        check_safetensors(b"\x80\x04" + b"\0" * 20, "w.safetensors", "b")
