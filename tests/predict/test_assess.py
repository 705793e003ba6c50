"""evaluate / calibrate end to end: the rule fitted on a calibration split travels in the
bundle, and predict applies it with no extra flags."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.cli.main import app
from imgtriage.errors import DataError
from imgtriage.evaluate import drift_check
from imgtriage.predict import Predictor
from imgtriage.predict.assess import calibrate_bundle, collect_logits, labelled_samples

runner = CliRunner()


@pytest.fixture()
def bundle(tiny_bundle, tmp_path):
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


def test_evaluate_cli_writes_json_html_and_reference(bundle, digits_folder, tmp_path):
    res = runner.invoke(app, ["evaluate", str(bundle), str(digits_folder), "--out",
                              str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert rep["meta"]["n_samples"] == 300
    assert 0 <= rep["metrics"]["accuracy"] <= 1
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "data:image/png;base64" in html
    assert (tmp_path / "eval" / "reference.json").is_file()


def test_logits_match_predictor_and_labels_follow_bundle_order(bundle, digits_folder):
    p = Predictor.load(bundle)
    samples = labelled_samples(digits_folder, p.classes)
    got = collect_logits(p, samples[:40], batch_size=16)
    probs = np.exp(got.logits - got.logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    report = p.predict_paths(got.paths, include_probs=True)
    direct = np.array([[r["probs"][c] for c in p.classes] for r in report["results"]])
    assert np.allclose(probs, direct, atol=1e-5)
    assert [p.classes[i] for i in got.labels] == [s.label for s in samples[:40]]


def test_unknown_labels_are_refused(bundle, digits_folder, tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "x" / c).mkdir(parents=True)
        shutil.copy(next((digits_folder / "d1").glob("*.png")), tmp_path / "x" / c / "a.png")
    with pytest.raises(DataError, match="not classes of the bundle"):
        labelled_samples(tmp_path / "x", Predictor.load(bundle).classes)


def test_a_folder_of_one_class_is_evaluated(bundle, digits_folder, tmp_path):
    """The recall of one class on a folder of that class alone is a real question."""
    shutil.copytree(digits_folder / "d1", tmp_path / "one" / "d1")
    res = runner.invoke(app, ["evaluate", str(bundle), str(tmp_path / "one"), "--out",
                              str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert rep["meta"]["n_samples"] == len(list((digits_folder / "d1").iterdir()))


def test_evaluating_on_the_training_data_warns(bundle, digits_folder, tiny_run, tmp_path):
    """The tiny bundle was trained on ``digits_folder``: its metrics there are not new data's."""
    res = runner.invoke(app, ["evaluate", str(bundle), str(digits_folder), "--out",
                              str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "is the data this bundle was trained on" in res.output
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "images the model has seen" in rep["extra"]["warnings"][0]
    splits = (Path(tiny_run.run_dir) / "splits.csv").read_text().splitlines()[1:]
    rows = [line.split(",") for line in splits]
    for name, split in (("held_out", "val"), ("copies", "train")):
        (tmp_path / name / "d1").mkdir(parents=True)
        for path, *_ in (r for r in rows if r[1] == "d1" and r[3] == split):
            shutil.copy(path, tmp_path / name / "d1" / f"renamed_{Path(path).name}")
    res = runner.invoke(app, ["evaluate", str(bundle), str(tmp_path / "held_out"), "--out",
                              str(tmp_path / "eval2")])
    assert res.exit_code == 0 and "warning" not in res.output
    # byte copies of training images under other names: the digests in the bundle know them
    res = runner.invoke(app, ["evaluate", str(bundle), str(tmp_path / "copies"), "--out",
                              str(tmp_path / "eval3")])
    n = len(list((tmp_path / "copies" / "d1").iterdir()))
    assert res.exit_code == 0, res.output
    assert f"warning: {n} of the {n} images are byte copies of images this bundle" in res.output


def test_split_names_are_read_as_a_manifest_row_would_be(bundle, digits_folder, tmp_path):
    files = sorted((digits_folder / "d1").glob("*.png"))[:3]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(
        f"{f},d1,{split}\n" for f, split in zip(files, ("train", "Validation", "val"),
                                                strict=True)))
    classes = Predictor.load(bundle).classes
    for given in ("validation", "VAL", "val"):
        assert len(labelled_samples(tmp_path / "m.csv", classes, given)) == 2


def test_calibrate_writes_rule_into_bundle_and_predict_applies_it(bundle, digits_folder):
    before = Predictor.load(bundle).predict_paths([digits_folder / "d2"])
    s = calibrate_bundle(bundle, digits_folder, threshold_strategy="target_precision",
                         target=0.9, abstain=True, conformal_method="aps", alpha=0.1)
    assert s["temperature"]["nll_after"] <= s["temperature"]["nll_before"] + 1e-9
    m = load_bundle(bundle).manifest
    assert m["bundle_version"] == 2 and m["decision"]["abstain"] is True
    assert len(m["decision"]["thresholds"]) == 10 and m["decision"]["conformal"]
    assert "default" in m["profiles"] and m["drift_reference"]["n_samples"] == 300
    after = Predictor.load(bundle).predict_paths([digits_folder / "d2"])
    assert after["meta"]["temperature"] == pytest.approx(m["decision"]["temperature"])
    assert after["meta"]["abstain"] is True
    for r_before, r_after in zip(before["results"], after["results"], strict=True):
        assert "set" in r_after and "set" not in r_before
        if r_after["abstained"]:
            assert r_after["class"] == "unknown"
    t = dict(zip(m["classes"], m["decision"]["thresholds"], strict=True))
    for r in after["results"]:
        cls = r["best_class"] if r["abstained"] else m["classes"][r["class_id"]]
        assert r["abstained"] == (r["score"] < t[cls] - 1e-6) or abs(r["score"] - t[cls]) < 1e-5


def test_calibrate_prints_each_fitted_threshold_and_warns_on_few_positives(bundle,
                                                                          digits_folder,
                                                                          tmp_path):
    shutil.copytree(digits_folder, tmp_path / "few")
    for extra in sorted((tmp_path / "few" / "d1").iterdir())[5:]:
        extra.unlink()  # 5 positives: below 1 / (1 - 0.95) = 20
    res = runner.invoke(app, ["calibrate", str(bundle), str(tmp_path / "few"),
                              "--threshold-strategy", "target_recall", "--target", "0.95",
                              "--positive-class", "d1", "--profile", "review"])
    assert res.exit_code == 0, res.output
    assert "threshold 'd1' (target_recall 0.95): " in res.output
    assert "of 5 positives" in res.output and "warning: 5 validation positive(s)" in res.output
    assert "threshold 'd0'" not in res.output  # not fitted: always accepted


def test_profiles_side_by_side(bundle, digits_folder, tmp_path):
    for name, strategy in (("precision", "target_precision"), ("recall", "target_recall")):
        res = runner.invoke(app, ["calibrate", str(bundle), str(digits_folder),
                                  "--threshold-strategy", strategy, "--target", "0.9",
                                  "--abstain", "--profile", name])
        assert res.exit_code == 0, res.output
    m = load_bundle(bundle).manifest
    assert set(m["profiles"]) == {"precision", "recall"}
    assert m["decision"]["thresholds"] is None  # named profiles do not replace the default
    p = Predictor.load(bundle)
    prec = p.predict_paths([digits_folder], profile="precision")
    rec = p.predict_paths([digits_folder], profile="recall")
    cov = [r["meta"]["coverage"] for r in (prec, rec)]
    assert prec["meta"]["profile"] == "precision" and cov[0] <= cov[1]
    res = runner.invoke(app, ["predict", str(bundle), str(digits_folder / "d1"),
                              "--profile", "nope", "-o", str(tmp_path / "r.json")])
    assert res.exit_code != 0


def test_drift_flags_a_shifted_folder(bundle, digits_folder, tmp_path):
    runner.invoke(app, ["evaluate", str(bundle), str(digits_folder), "--out",
                        str(tmp_path / "eval")])
    same = runner.invoke(app, ["evaluate", str(bundle), str(digits_folder), "--reference",
                               str(tmp_path / "eval"), "--out", str(tmp_path / "d1.json")])
    assert same.exit_code == 0, same.output
    assert json.loads((tmp_path / "d1.json").read_text())["shift"] is False
    shifted = runner.invoke(app, ["evaluate", str(bundle), str(digits_folder / "d0"),
                                  "--reference", str(tmp_path / "eval"), "--out",
                                  str(tmp_path / "d2.json")])
    assert shifted.exit_code == 1
    assert json.loads((tmp_path / "d2.json").read_text())["shift"] is True


def test_drift_against_a_reference_from_before_reported_probabilities(bundle, digits_folder,
                                                                      tmp_path):
    """A prior-corrected bundle's stored reference from before its probabilities were
    reported at the training prior holds equal-prior scores: the check compares those."""
    from imgtriage.bundle import update_bundle
    from imgtriage.evaluate import reference_summary
    from imgtriage.predict.assess import drift_against

    offsets = [3.0] + [-3.0 / 9] * 9  # strong enough that the two kinds of score differ
    forced = tmp_path / "forced"
    dec = {**load_bundle(bundle).manifest["decision"], "prior_correction": offsets}
    update_bundle(bundle, {"decision": dec}, note="test: prior correction", out=forced)
    p = Predictor.load(forced)
    rows = p.predict_paths([digits_folder], include_probs=True)["results"]
    probs = np.array([[r["probs"][c] for c in p.classes] for r in rows])
    scores = probs * np.exp(offsets)
    old = reference_summary(scores / scores.sum(1, keepdims=True))
    del old["probabilities"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(reference_summary(probs)))
    for ref in ("old", "new"):
        out = drift_against(forced, [digits_folder], tmp_path / f"{ref}.json")
        assert out["shift"] is False and ("note" in out) == (ref == "old")
    # compared as they are, the old reference's scores would look like a shift
    plain = drift_check(old, probs, class_names=p.classes)
    assert plain["shift"] is True
