"""evaluate --ood, the report's headline under the rule, galleries without repeats, conformal
sets never empty, and calibrate keeping the bundle's OOD rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.cli.main import app
from imgtriage.evaluate import ConformalPredictor, DecisionPolicy, build_report, render_html


def _junk_folder(root):
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / f"n{i}.png")
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(root / "grey.png")
    (root / "broken.png").write_bytes(b"")  # counted apart, never silently
    return root


def test_evaluate_ood_folder_reports_auroc_fpr_and_refusals(calibrated_run, digits_folder,
                                                            tmp_path):
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, ["evaluate", str(calibrated_run.bundle_path),
                                   str(digits_folder), "--out", str(out), "--ood",
                                   str(_junk_folder(tmp_path / "junk"))])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    o = rep["ood"]
    assert o["n"] == 7 and set(o["methods"]) == {"knn+rmd+stages", "msp"}  # the bundle's method
    assert o["methods"]["knn+rmd+stages"]["auroc"] > 0.9 and o["refused"] == 1.0
    assert o["refused_by_reason"]["out_of_distribution"] >= 1
    assert "OOD folder (7 images, 1 unreadable: report.json ood.defects)" in res.output
    assert "knn+rmd+stages AUROC" in res.output and "Out-of-distribution images" in (
        out / "report.html").read_text()
    # the headline is the decision section's numbers, refusals counted by reason
    h, d = rep["headline"], rep["decision"]
    assert (h["coverage"], h["accuracy_answered"], h["abstained"]) == (
        d["coverage"], d["accuracy_at_coverage"], d["abstain_count"])
    assert sum(h["abstained_by_reason"].values()) == h["abstained"]


def test_report_headline_equals_the_rules_numbers():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 3
    y = np.where(rng.random(200) < 0.8, logits.argmax(1), rng.integers(0, 3, 200))
    ood = rng.random(200)
    policy = DecisionPolicy(temperature=1.3, thresholds=(0.7,) * 3, abstain=True,
                            ood={"method": "knn", "threshold": 0.9})
    rep = build_report(logits=logits, labels=y, class_names=list("abc"),
                       paths=[f"{i}.png" for i in range(200)], decision=policy,
                       ood_scores=ood)
    d = policy.decide(logits, ood)
    kept = ~d.abstained
    assert rep["headline"]["coverage"] == kept.mean()
    assert rep["headline"]["accuracy_answered"] == (d.class_id[kept] == y[kept]).mean()
    assert rep["headline"]["abstained_by_reason"]["out_of_distribution"] == int(
        (ood > 0.9).sum())
    html = render_html(rep, {}, None)
    assert "Under the bundle's rule" in html
    assert f"abstains on {rep['headline']['abstained']} (" in html


def test_binary_gallery_shows_each_mistake_once():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(60, 2))
    y = rng.integers(0, 2, 60)
    policy = DecisionPolicy(thresholds=(0.0, 0.0), abstain=True)
    rep = build_report(logits=logits, labels=y, class_names=["ok", "bad"],
                       paths=[f"img{i:03d}.png" for i in range(60)], decision=policy)
    html = render_html(rep, {}, None)
    wrong = [f"img{i:03d}.png" for i in range(60) if logits[i].argmax() != y[i]]
    shown = [p for p in wrong if p in html]
    assert shown and all(html.count(p) == 1 for p in shown)


def test_conformal_sets_are_never_empty_unless_allowed():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(2), size=400)
    y = np.array([rng.choice(2, p=r) for r in probs])
    strict = ConformalPredictor("aps", alpha=0.3, randomized=True).fit(probs, y)
    loose = ConformalPredictor("aps", alpha=0.3, randomized=True, allow_empty=True).fit(probs, y)
    assert (loose.predict_mask(probs).sum(1) == 0).any()  # APS can give empty sets
    assert (strict.predict_mask(probs).sum(1) >= 1).all()
    again = ConformalPredictor.from_dict(strict.to_dict())
    assert again.allow_empty is False and min(map(len, again.predict_sets(probs))) == 1


def test_conformal_per_class_coverage_is_in_the_html():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(100, 3)) * 2
    y = logits.argmax(1)
    cp = ConformalPredictor("lac", alpha=0.1).fit(np.exp(logits) / np.exp(logits).sum(
        1, keepdims=True), y)
    rep = build_report(logits=logits, labels=y, class_names=["x", "y", "z"],
                       paths=[f"{i}" for i in range(100)],
                       decision=DecisionPolicy(conformal=cp.to_dict()))
    assert "coverage (true class in its set)" in render_html(rep, {}, None)


def test_calibrate_keeps_the_ood_rule_and_rechooses_its_threshold(calibrated_run,
                                                                  digits_folder, tmp_path):
    bundle = shutil.copytree(calibrated_run.bundle_path, tmp_path / "b")
    res = CliRunner().invoke(app, ["calibrate", str(bundle), str(digits_folder),
                                   "--threshold-strategy", "target_recall", "--target", "0.9",
                                   "--delta", "0.05"])
    assert res.exit_code == 0, res.output
    m = load_bundle(bundle).manifest
    assert m["decision"]["ood"]["method"] == "knn+rmd+stages"
    assert m["decision"]["ood"]["n_val"] == 300  # re-chosen on the 300 given images
    assert "order statistic 1 of 30 positives: recall >= 0.9" in res.output
    achieved = m["calibration"]["default"]["thresholds"]["achieved"]
    assert all(a["rests_on_positives"] == 30 and a["min_positives"] == 29 for a in achieved)


def test_calibrate_ood_accept_rechooses_the_threshold_at_that_share(calibrated_run,
                                                                    digits_folder, tmp_path):
    from imgtriage.predict import Predictor

    def refused(bundle) -> float:
        rows = Predictor.load(bundle).predict_paths([digits_folder])["results"]
        assert len(rows) == 300
        return float(np.mean([r["reason"] == "out_of_distribution" for r in rows]))

    shares = {}
    for accept in (0.9, 0.99):
        bundle = shutil.copytree(calibrated_run.bundle_path, tmp_path / f"b{accept}")
        res = CliRunner().invoke(app, ["calibrate", str(bundle), str(digits_folder),
                                       "--target-accuracy", "0.5", "--ood-accept", str(accept)])
        assert res.exit_code == 0, res.output
        rule = load_bundle(bundle).manifest["decision"]["ood"]
        assert rule["accept"] == accept and rule["n_val"] == 300
        shares[accept] = refused(bundle)
        # a conformal quantile of the same 300 images: at most 1 - accept of them refused
        assert shares[accept] <= 1 - accept + 1e-9
    assert shares[0.9] > shares[0.99]  # a lower stated acceptance refuses more
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "b0.9"), str(digits_folder),
                                   "--no-ood", "--ood-accept", "0.9"])
    assert res.exit_code != 0 and "--no-ood" in f"{res.output}{res.exception}"
