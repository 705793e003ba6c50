"""The typed manifest is written in one place and reads back equal: write -> read -> equal for
every block a writer sets; an old bundle's manifest serialises back to exactly its bytes' JSON
(same sha256); unknown and missing fields are refused with a message naming them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from imgtriage.bundle import Manifest, load_bundle, new_manifest, save_bundle, update_bundle
from imgtriage.bundle.record import BLOCKS, upgrade
from imgtriage.data import PreprocessSpec
from imgtriage.errors import BundleSchemaError

V1 = Path(__file__).parent / "data" / "v1_classifier"
STATE = {"w": torch.zeros(2, 3)}


def _fresh(**blocks) -> Manifest:
    m = new_manifest(model_name="crop_cnn", model_kwargs={"widths": (4, 8)}, in_chans=1,
                     preprocess=PreprocessSpec(in_chans=1, size=(16, 16), mean=(0.5,),
                                               std=(0.25,)).to_dict(),
                     classes=["dark", "bright"], decision={"temperature": np.float32(1.5)},
                     training={"data": Path("/data/x"), "counts": {"dark": np.int64(3)}},
                     metrics={"val_accuracy": np.float64(0.75)})
    return m.with_changes(**blocks) if blocks else m


WRITTEN = {
    "classifier": _fresh(),
    "with every block": _fresh(tta=["hflip"], profiles={"strict": {"temperature": 2.0}},
                               **{name: {"note": name, "values": (1, 2)} for name in BLOCKS}),
    "cleared block": _fresh(threshold_fit=None),
    "gallery kind": replace(_fresh(gallery={"method": "knn", "k": 3}), kind="gallery"),
}


@pytest.mark.parametrize("name", list(WRITTEN))
def test_write_then_read_gives_the_same_record(name, tmp_path):
    m = WRITTEN[name]
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    for target in (tmp_path / "b", tmp_path / "b.zip"):
        b = load_bundle(save_bundle(target, m, STATE))
        assert b.info == replace(m, files=b.info.files)
        assert set(b.info.files) == {"weights.safetensors"}
        assert b.manifest == b.info.to_dict()  # what is on disk is the one serialisation


def test_an_old_bundle_serialises_back_to_exactly_its_manifest():
    b = load_bundle(V1)
    assert b.info.to_dict() == b.manifest
    assert json.dumps(b.info.to_dict(), sort_keys=True) == json.dumps(b.manifest, sort_keys=True)


def test_an_early_v1_manifest_gains_only_the_defaults_on_rewriting(tmp_path):
    raw = dict(load_bundle(V1).manifest)
    for key in ("kind", "profiles", "history", "tta"):
        raw.pop(key)
    out = save_bundle(tmp_path / "b", raw, load_bundle(V1).state_dict())
    again = load_bundle(out).manifest
    assert {k: v for k, v in again.items() if k != "files"} == \
        {k: v for k, v in upgrade(raw).items() if k != "files"}


def test_update_bundle_writes_the_typed_record_and_keeps_the_old_one(tmp_path):
    copy = Path(shutil.copytree(V1, tmp_path / "b"))
    old = load_bundle(copy)
    new = update_bundle(copy, {"tta": ["vflip"], "onnx": {"file": None, "reason": "test"}},
                        note="retuned")
    assert new.info == old.info.with_changes(
        tta=["vflip"], onnx={"file": None, "reason": "test"}, bundle_version=3,
        history=[{"version": 1, "note": "a strict profile (v1 fixture)"},
                 {"version": 2, "note": "retuned"}], files=new.info.files)
    assert json.loads(new.read_bytes("history/manifest.v2.json")) == old.manifest


@pytest.mark.parametrize(("change", "words"), [
    ({"tta_views": ["hflip"]}, ["tta_views", "not part of schema version 1", "BLOCKS"]),
    ({"model": {"name": "crop_cnn", "kwargs": {}, "in_chans": 1, "num_classes": 2,
                "depth": 3}}, ["'model' block", "unknown keys ['depth']"]),
    ({"model": {"name": "crop_cnn", "kwargs": {}, "num_classes": 2}},
     ["'model' block", "lacks ['in_chans']"]),
    ({"history": [{"note": "no version"}]}, ["history entry", "lacks ['version']"]),
    ({"history": [{"version": 1, "when": "today"}]}, ["history entry", "unknown keys"]),
    ({"metrics": {"when": object()}}, ["cannot hold a object"]),
])
def test_unknown_and_missing_fields_are_refused_naming_them(change, words, tmp_path):
    with pytest.raises(BundleSchemaError) as err:
        WRITTEN["classifier"].with_changes(**change)
    assert all(w in str(err.value) for w in words), str(err.value)
    copy = Path(shutil.copytree(V1, tmp_path / "b"))
    with pytest.raises(BundleSchemaError):
        update_bundle(copy, change, note="bad")
    assert load_bundle(copy).info.bundle_version == 2  # nothing was written


@pytest.mark.parametrize(("edit", "words"), [
    (lambda m: m.update(onnx_graph={}), ["onnx_graph", "not part of schema version 1"]),
    (lambda m: m["model"].update(depth=3), ["'model' block", "depth"]),
    (lambda m: m["model"].pop("num_classes"), ["num_classes"]),
    (lambda m: m.pop("preprocess"), ["preprocess"]),
])
def test_a_manifest_edited_by_hand_is_refused_on_loading(edit, words, tmp_path):
    copy = Path(shutil.copytree(V1, tmp_path / "b"))
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleSchemaError) as err:
        load_bundle(copy)
    assert str(copy) in str(err.value) and all(w in str(err.value) for w in words)
