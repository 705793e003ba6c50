"""The Ray engine on a real local cluster (2 CPUs) against the local engine, file for file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from imgtriage.cli.main import app
from imgtriage.integrations.ray_engine import META_FILE, RayConfig, ray_predict
from imgtriage.predict import Predictor

pytest.importorskip("ray")
pytest.importorskip("ray.data")
pads = pytest.importorskip("pyarrow.dataset")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor.load(tiny_bundle)


def test_ray_report_equals_local_report_bad_files_included(
        ray_cluster, tiny_bundle, predictor, mixed_inputs, same_report):
    opts = {"include_probs": True, "topk": 3}
    want = predictor.predict_paths(mixed_inputs, batch_size=16, **opts)
    # small blocks: 304 files in 8 blocks, so order is restored across blocks and batches
    got = ray_predict(tiny_bundle, mixed_inputs, config=RayConfig(batch_size=16,
                                                                  files_per_block=40), **opts)
    same_report(got, want)
    assert {d["issue"] for d in got["defects"]} == {"empty_file", "format_mismatch",
                                                   "truncated", "not_found"}
    assert len(got["results"]) == 300
    assert got["meta"]["engine"] == "ray"
    assert got["meta"]["ray"]["num_actors"] == 1 and got["meta"]["ray"]["cluster_cpus"] == 2


def test_ray_parquet_dataset_holds_every_file_once(
        ray_cluster, tiny_bundle, predictor, mixed_inputs, tmp_path):
    threshold = _middle_gap(predictor, mixed_inputs)
    opts = {"tta": True, "abstain": True, "thresholds": (threshold,) * 10}
    want = predictor.predict_paths(mixed_inputs, batch_size=32, **opts)
    assert 100 < sum(r["abstained"] for r in want["results"]) < 200  # the rule bites
    out = tmp_path / "ds"
    got = ray_predict(tiny_bundle, mixed_inputs, dataset_dir=out, **opts)
    table = pads.dataset(out, format="parquet").to_table().sort_by("index")
    assert table.column("index").to_pylist() == list(range(304))
    rows = table.to_pylist()
    results = [r for r in rows if r["kind"] == "result"]
    for r, w in zip(results, want["results"], strict=True):
        assert (r["path"], r["class"], r["abstained"]) == (w["path"], w["class"],
                                                           w["abstained"])
        assert abs(r["score"] - w["score"]) <= 2e-6  # one step of 6-decimal rounding
    assert got["results"] == [] and got["defects"] == want["defects"]
    for key in ("num_files", "coverage", "abstain", "thresholds", "tta", "bundle_sha256"):
        assert got["meta"][key] == want["meta"][key], key
    assert got["meta"]["results_in"] == str(out)
    assert json.loads((out / META_FILE).read_text())["meta"]["num_files"] == 304


def test_ray_parquet_dataset_of_a_cascade_counts_its_stages(
        ray_cluster, tiny_bundle, digits_folder, mixed_inputs, tmp_path):
    """Issue 19: every cascade report has its per-stage counts, the Parquet dataset's too."""
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    res = build_cascade(tiny_bundle, digits_folder, tmp_path / "cascade",
                        CascadeConfig(route_share=0.5))
    got = ray_predict(res.bundle_path, mixed_inputs, dataset_dir=tmp_path / "ds")
    rows = pads.dataset(tmp_path / "ds", format="parquet").to_table().to_pylist()
    extras = [json.loads(r["extra"]) for r in rows if r["kind"] == "result"]
    stages = [e["stage"] for e in extras]
    c = got["meta"]["cascade"]
    assert (c["stage1"], c["stage2"]) == (stages.count(1), stages.count(2)) and c["stage1"]
    assert c["stage1"] + c["stage2"] == 300
    # issue 15: how many the first stage's OOD gate sent to stage 2
    assert c["stage1_ood"] == sum(bool(e.get("stage1_ood")) for e in extras)


def _middle_gap(predictor, inputs) -> float:
    """A threshold that abstains on about half the files and sits far from every score, so
    float noise between engines cannot flip a decision."""
    scores = sorted(r["score"] for r in predictor.predict_paths(inputs, tta=True)["results"])
    i = max(range(100, 200), key=lambda j: scores[j] - scores[j - 1])
    return (scores[i] + scores[i - 1]) / 2


def test_cli_engine_ray_relative_paths(ray_cluster, tiny_bundle, predictor, mixed_folder,
                                       tmp_path, monkeypatch):
    monkeypatch.chdir(mixed_folder.parent)
    want = predictor.predict_paths(["inbox", "missing.png"])
    out = tmp_path / "ray.jsonl"
    res = CliRunner().invoke(app, ["predict", str(tiny_bundle), "inbox", "missing.png",
                                   "--engine", "ray", "--output", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["kind"] == "meta" and lines[0]["engine"] == "ray"
    got = [(r["path"], r["class"]) for r in lines[1:] if r["kind"] == "result"]
    assert got == [(r["path"], r["class"]) for r in want["results"]]
    bad = [{k: r[k] for k in ("path", "issue", "message")} for r in lines[1:]
           if r["kind"] == "defect"]
    assert bad == want["defects"]  # named as given: "inbox/d0/empty.png", not absolute
    assert bad[0]["path"].startswith("inbox/")
