"""Batch runs over a folder of everything an inbox collects: every file exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from predict_helpers import copy_bundle, deny_read, make_messy_folder, outcome

from imgtriage.bundle import load_bundle, update_bundle
from imgtriage.predict import Predictor
from imgtriage.predict.batch import iter_predictions
from imgtriage.predict.runner import run_batch


@pytest.fixture(scope="module")
def messy(tmp_path_factory, digits_folder):
    root = tmp_path_factory.mktemp("messy")
    return root, make_messy_folder(root, digits_folder)


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor.load(tiny_bundle, backend="torch", num_threads=1)


def test_messy_folder_every_file_once_with_its_reason(messy, predictor, monkeypatch):
    root, expected = messy
    deny_read(monkeypatch, "locked.png")
    report = predictor.predict_paths([root], batch_size=4)
    assert outcome(report, root) == {**expected, "locked.png": "permission_denied"}
    assert report["meta"]["num_files"] == len(expected)
    for d in report["defects"]:
        assert d["message"].strip() and set(d) == {"path", "issue", "message"}
    for r in report["results"]:
        assert 0.0 <= r["score"] <= 1.0 and r["class"] in predictor.classes


@pytest.mark.parametrize("batch_size,prefetch", [(1, 1), (3, 2), (64, 4)])
def test_batching_never_changes_the_outcome(messy, predictor, batch_size, prefetch):
    root, expected = messy
    items = list(iter_predictions(predictor, [root], batch_size=batch_size, prefetch=prefetch,
                                  workers=2))
    got = {str(Path(i["path"]).relative_to(root)): (i.get("issue") if k == "defect" else None)
           for k, i in items}
    assert len(items) == len(got) and got == expected


def test_process_workers_and_store_agree_with_threads(messy, predictor, tmp_path):
    root, expected = messy
    out = tmp_path / "r.jsonl"
    run = run_batch(predictor, [root], output=out, store=tmp_path / "s.sqlite",
                    executor="process", workers=2, batch_size=5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "meta" and lines[0]["num_files"] == len(expected)
    got = {str(Path(r["path"]).relative_to(root)): r["issue"] for r in lines[1:]}
    assert got == expected and run.n_new == len(expected) and run.n_skipped == 0
    threads = {r["path"]: r for r in predictor.predict_paths([root])["results"]}
    for r in lines[1:]:
        if r["kind"] == "result":
            assert r["class"] == threads[r["path"]]["class"]
            assert r["score"] == pytest.approx(threads[r["path"]]["score"], abs=1e-5)


def test_overlapping_inputs_still_give_each_file_once(messy, predictor, tmp_path):
    root, expected = messy
    out = tmp_path / "r.json"
    run_batch(predictor, [root, root / "a", root / "zero.png"], output=out)
    report = json.loads(out.read_text())
    assert outcome(report, root) == expected


def test_the_bundles_read_policy_decides_what_is_too_large(tiny_bundle, tmp_path, messy):
    root, _ = messy
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    pre = load_bundle(b).manifest["preprocess"]
    update_bundle(b, {"preprocess": {**pre, "read": {**pre["read"], "max_pixels": 500}}},
                  note="tiny pixel limit")
    report = Predictor.load(b, backend="torch").predict_paths([root / "a" / "good1.png"])
    (d,) = report["defects"]
    assert d["issue"] == "too_many_pixels" and "max_pixels" in d["message"]


def test_missing_paths_and_folders_mix(predictor, tmp_path, digits_folder):
    report = predictor.predict_paths([digits_folder / "d1", tmp_path / "nope.png",
                                      tmp_path / "nodir"])
    issues = {Path(d["path"]).name: d["issue"] for d in report["defects"]}
    assert issues == {"nope.png": "not_found", "nodir": "not_found"}
    assert len(report["results"]) == len(list((digits_folder / "d1").glob("*.png")))
