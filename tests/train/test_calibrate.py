"""The end of training: calibrated on validation, a default abstain rule, an OOD scorer,
and the same reason for the same bytes through the API, the CLI and HTTP."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.evaluate.ood import (
    KnnRmdOOD,
    KnnRmdStagesOOD,
    scorer_from_rule,
    threshold_from_scores,
)
from imgtriage.evaluate.policy import fit_decision_policy
from imgtriage.predict import Predictor

JUNK = {"noise.png": np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8),
        "constant.png": np.full((32, 32), 117, np.uint8),
        "blank.png": np.zeros((32, 32), np.uint8)}


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_default_bundle_is_calibrated_on_validation_with_an_abstain_rule(calibrated_run):
    m = load_bundle(calibrated_run.bundle_path).manifest
    d, cal = m["decision"], m["calibration"]["default"]
    assert d["temperature"] != 1.0 and cal["temperature"]["kept"] is True
    assert cal["temperature"]["n"] == calibrated_run.metrics["val_count"]
    assert cal["temperature"]["nll_after"] < cal["temperature"]["nll_before"]
    assert d["abstain"] is True and len(set(d["thresholds"])) == 1
    assert cal["thresholds"]["strategy"] == "target_accuracy"
    assert d["ood"]["method"] == "knn+rmd+stages" and "ood.safetensors" in m["files"]
    assert d["ood"]["stage_widths"] and d["ood"]["dim"] > 0  # the crop CNN's earlier blocks
    assert m["profiles"]["default"] == d
    r = cal["default_rule"]
    assert calibrated_run.rule == (
        f"answers {100 * r['coverage']:.0f}% of validation images at "
        f"{100 * r['accuracy_answered']:.1f}% accuracy; abstains on the rest (validation "
        f"n={r['n']}: {r['abstained_low_confidence']} low confidence, {r['abstained_ood']} out "
        "of distribution)")


def test_no_calibrate_keeps_the_raw_model(tiny_run):
    m = load_bundle(tiny_run.bundle_path).manifest
    assert m["decision"]["temperature"] == 1.0 and m["decision"]["abstain"] is False
    assert m["calibration"]["default"] == {"skipped": "--no-calibrate"}
    assert not any(f.startswith("ood") for f in m["files"])


def test_noise_constant_and_blank_are_refused_as_out_of_distribution(calibrated_run):
    p = Predictor.load(calibrated_run.bundle_path, num_threads=1)
    rows = p.predict_bytes([_png(a) for a in JUNK.values()], names=list(JUNK))
    assert [(r["abstained"], r["reason"], r["class"]) for r in rows] == [
        (True, "out_of_distribution", "unknown")] * 3


def test_ood_threshold_is_reproducible_from_the_stored_statistics(calibrated_run,
                                                                   digits_folder):
    b = load_bundle(calibrated_run.bundle_path)
    rule = b.manifest["decision"]["ood"]
    arrays = load(b.verified_bytes(rule["file"]))
    assert len(arrays["val_scores"]) == rule["n_val"] == calibrated_run.metrics["val_count"]
    assert threshold_from_scores(arrays["val_scores"], rule["accept"]) == rule["threshold"]
    assert np.mean(arrays["val_scores"] <= rule["threshold"]) >= rule["accept"]
    # rebuilt from the stored arrays, it gives the validation scores the threshold rests on
    ood = scorer_from_rule(rule, arrays)
    assert isinstance(ood, KnnRmdStagesOOD) and ood.threshold_ == rule["threshold"]
    # the stored bank scores a training image (its own neighbour) near zero
    # (its penultimate part read alone, as a knn+rmd rule of the same arrays)
    near = KnnRmdOOD.from_rule({**rule, "method": "knn+rmd", "k": 1}, arrays).components(
        arrays["bank"][:3])
    assert near["knn"].max() < 1e-3


def test_cli_api_and_http_give_the_same_reason_for_the_same_bytes(calibrated_run, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgtriage.cli.main import app
    from imgtriage.serve import ServeConfig, create_app

    files = dict(JUNK)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, a in files.items():
        (folder / name).write_bytes(_png(a))
    api = {r["path"].split("/")[-1]: r["reason"] for r in Predictor.load(
        calibrated_run.bundle_path).predict_paths([folder])["results"]}
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, ["predict", str(calibrated_run.bundle_path), str(folder),
                                   "--output", str(out)])
    assert res.exit_code == 0, res.output
    cli = {json.loads(line)["path"].split("/")[-1]: json.loads(line).get("reason")
           for line in out.read_text().splitlines() if '"path"' in line}
    cfg = ServeConfig(bundle=str(calibrated_run.bundle_path), threads=1)
    with TestClient(create_app(cfg)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = client.post("/v1/classify", files=[
            ("files", (n, (folder / n).read_bytes(), "image/png")) for n in files]).json()
    http = {r["path"]: r["reason"] for r in rows["results"]}
    assert api == cli == http == {n: "out_of_distribution" for n in files}


def test_temperature_that_does_not_lower_nll_is_not_kept():
    logits = np.zeros((20, 2))  # every temperature gives the same NLL
    policy, summary = fit_decision_policy(logits, np.arange(20) % 2, class_names=["a", "b"])
    assert policy.temperature == 1.0 and summary["temperature"]["kept"] is False
    assert "kept T = 1" in summary["temperature"]["note"]


def test_torch_and_onnx_backends_give_the_same_ood_scores_and_reasons(calibrated_run,
                                                                       digits_folder):
    m = load_bundle(calibrated_run.bundle_path).manifest
    assert m["onnx"]["outputs"] == ["logits", "features", "ood_score"]
    data = [_png(a) for a in JUNK.values()]
    data += [p.read_bytes() for p in sorted(digits_folder.glob("*/*.png"))[::25]]
    rows = {}
    for backend in ("torch", "onnx"):  # the fp32 graph, asked for (int8 may be the default)
        p = Predictor.load(calibrated_run.bundle_path, backend=backend, num_threads=1,
                           precision="fp32")
        rows[backend] = p.predict_bytes(data)
        x = np.stack([p.decode_bytes([b])[0].x for b in data])
        rows[backend + "_scores"] = p.forward(x, p.policy)[1]
    assert [r["reason"] for r in rows["torch"]] == [r["reason"] for r in rows["onnx"]]
    finite = np.isfinite(rows["torch_scores"])
    np.testing.assert_allclose(rows["onnx_scores"][finite], rows["torch_scores"][finite],
                               atol=1e-4, rtol=1e-5)


def test_inspect_says_what_the_default_rule_refuses(calibrated_run, tiny_run):
    from imgtriage.cli.main import app

    out = CliRunner().invoke(app, ["inspect", str(calibrated_run.bundle_path)]).output
    assert "unknowns    out-of-distribution: knn+rmd+stages k=5" in out and "answers " in out
    raw = CliRunner().invoke(app, ["inspect", str(tiny_run.bundle_path)]).output
    assert "no out-of-distribution rule; not calibrated: --no-calibrate" in raw
