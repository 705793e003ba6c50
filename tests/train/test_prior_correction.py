"""Selecting by balanced accuracy decides at equal class priors (logit adjustment), and the
bundle carries that correction, so every way of asking gives the same answers."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.predict import Predictor
from imgtriage.train.calibrate import calibrate_run
from imgtriage.train.losses import plan_loss, prior_offsets
from imgtriage.train.pipeline import ArraySource
from imgtriage.train.run import train

from .conftest import tiny_cfg


@pytest.fixture(scope="module")
def balanced_run(imbalanced_folder, tmp_path_factory):
    """The 24 / 10 / 4 digits trained with the recipe --model auto picks for imbalanced
    classes (square-root class weights, best epoch by balanced accuracy), the correction asked
    for (--prior-correction on: kept whatever validation says; auto's check is tested below
    on arrays where it must keep or drop it)."""
    cfg = tiny_cfg(loss_strategy="class_weights", select_metric="val_balanced_accuracy",
                   epochs=3, prior_correction="on")
    return train(imbalanced_folder, tmp_path_factory.mktemp("prior"), cfg, quiet=True)


def _train_counts(run) -> list[int]:
    rows = [line.split(",") for line in (run / "splits.csv").read_text().splitlines()[1:]]
    return [sum(r[1] == c and r[3] == "train" for r in rows) for c in ("d0", "d1", "d2")]


def test_the_bundle_carries_the_prior_the_loss_saw_and_says_so(balanced_run):
    run = balanced_run.run_dir
    weights = json.loads((run / "class_weights.json").read_text())["weights"]
    expected = prior_offsets(_train_counts(run), weights)
    m = load_bundle(balanced_run.bundle_path).manifest
    assert m["decision"]["prior_correction"] == pytest.approx(expected.tolist())
    assert expected[2] > expected[1] > expected[0]  # the rarest class is raised most
    said = json.loads((run / "run.json").read_text())["prior_correction"]
    assert said["applied"] is True and list(said["offsets"]) == ["d0", "d1", "d2"]
    assert said == m["calibration"]["default"]["prior_correction"]
    assert said["line"] in balanced_run.rule  # printed at the end of training
    from imgtriage.cli.main import app

    shown = CliRunner().invoke(app, ["inspect", str(balanced_run.bundle_path)]).output
    assert f"prior_correction={m['decision']['prior_correction']}" in shown
    words = "decides at equal class priors; reports probabilities at the training prior"
    assert words in shown and words in said["line"] and said["behaviour"] == words
    # selection saw the same decision: the logged balanced accuracy is the corrected one's
    best = json.loads((run / "metrics.jsonl").read_text().splitlines()[
        balanced_run.metrics["best_epoch"] - 1])
    assert best["val_balanced_accuracy"] == pytest.approx(balanced_run.metrics[
        "val_balanced_accuracy"])


def test_the_evaluation_report_says_what_training_decided(balanced_run, imbalanced_folder,
                                                          tmp_path):
    from imgtriage.predict.assess import evaluate_bundle

    said = json.loads((balanced_run.run_dir / "run.json").read_text())["prior_correction"]
    report = evaluate_bundle(balanced_run.bundle_path, imbalanced_folder, tmp_path)
    assert report["extra"]["prior_correction"] == said["line"]
    assert "--prior-correction on: kept as asked" in said["line"]


def test_accuracy_selection_keeps_the_data_prior(imbalanced_folder, tmp_path):
    res = train(imbalanced_folder, tmp_path, tiny_cfg(epochs=1), quiet=True)
    m = load_bundle(res.bundle_path).manifest
    assert m["decision"]["prior_correction"] is None
    said = json.loads((tmp_path / "run.json").read_text())["prior_correction"]
    assert said["applied"] is False and "val_accuracy" in said["why"]
    assert said["behaviour"] == "decides and reports probabilities at the training prior"


def test_the_correction_stays_without_calibration(imbalanced_folder, tmp_path):
    cfg = tiny_cfg(epochs=1, calibrate=False, select_metric="val_balanced_accuracy",
                   prior_correction="on")
    res = train(imbalanced_folder, tmp_path, cfg, quiet=True)
    d = load_bundle(res.bundle_path).manifest["decision"]
    assert d["temperature"] == 1.0 and d["abstain"] is False
    assert d["prior_correction"] == pytest.approx(
        prior_offsets(_train_counts(tmp_path), None).tolist())


CLASSES = ("d0", "d1", "d2")


def _top(rows: list[dict]) -> list[int]:
    """The class the rule decided for each row (abstained rows too: ``best_class``, its own
    answer before it abstains)."""
    return [CLASSES.index(r.get("best_class", r["class"])) for r in rows]


def _answers(bundle, folder, paths, tmp_path, rows: dict | None = None
             ) -> dict[str, list[int]]:
    """The answer per file from the API (torch and ONNX fp32), the CLI and the service;
    ``rows`` (a dict) collects each way's result rows without their path."""
    rows = {} if rows is None else rows
    from fastapi.testclient import TestClient

    from imgtriage.cli.main import app
    from imgtriage.serve import ServeConfig, create_app

    got = {}
    for backend in ("torch", "onnx"):
        p = Predictor.load(bundle, backend=backend, num_threads=1, precision="fp32")
        rows[backend] = p.predict_bytes([q.read_bytes() for q in paths], include_probs=True)
        got[backend] = _top(rows[backend])
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["predict", str(bundle), str(folder), "--output", str(out),
                                   "--backend", "onnx", "--precision", "fp32", "--include-probs"])
    assert res.exit_code == 0, res.output
    by_path = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    rows["cli"] = [by_path[str(p)] for p in paths]
    got["cli"] = _top(rows["cli"])
    cfg = ServeConfig(bundle=str(bundle), threads=1, max_images=len(paths), precision="fp32")
    with TestClient(create_app(cfg)) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.post("/v1/classify?include_probs=true", files=[
            ("files", (f"{i}.png", p.read_bytes(), "image/png")) for i, p in enumerate(paths)])
    assert answer.status_code == 200, answer.text
    rows["http"] = sorted(answer.json()["results"], key=lambda r: int(r["path"][:-4]))
    got["http"] = _top(rows["http"])
    for found in rows.values():
        for r in found:
            r.pop("path")
    return got


def test_api_cli_http_and_onnx_answer_with_the_corrected_argmax(balanced_run,
                                                               imbalanced_folder, tmp_path):
    pytest.importorskip("fastapi")
    from imgtriage.bundle import update_bundle

    paths = sorted(imbalanced_folder.glob("*/*.png"))
    bundle = balanced_run.bundle_path
    p = Predictor.load(bundle, backend="torch", num_threads=1)
    x = np.stack([p.decode_bytes([q.read_bytes()])[0].x for q in paths])
    plain = p.logits(x) / p.policy.temperature
    z = plain + np.asarray(p.policy.prior_correction)
    expected = [int(i) for i in z.argmax(1)]
    rows: dict[str, list[dict]] = {}
    got = _answers(bundle, imbalanced_folder, paths, tmp_path / "a", rows)
    assert got == {k: expected for k in ("torch", "onnx", "cli", "http")}
    # the reported probabilities are softmax(logits / T), the training prior's, not the
    # equal-prior scores the rule decided with; the API, CLI and service (ONNX fp32) give the
    # same bytes, the torch backend the same numbers
    assert json.dumps(rows["onnx"]) == json.dumps(rows["cli"]) == json.dumps(rows["http"])
    reported = np.exp(plain - plain.max(1, keepdims=True))
    reported /= reported.sum(1, keepdims=True)
    for way in ("torch", "onnx"):
        probs = np.array([[r["probs"][c] for c in CLASSES] for r in rows[way]])
        np.testing.assert_allclose(probs, reported, atol=2e-5)
        scores = [r["score"] for r in rows[way]]
        np.testing.assert_allclose(scores, reported[np.arange(len(paths)), expected], atol=2e-5)
    # the correction is read from the bundle by every path: one raising the class the model
    # answers least by 40 nats makes it every answer wherever it is asked, abstaining or not
    rare = int(np.argmin(np.bincount(expected, minlength=3)))
    forced, offsets = tmp_path / "forced", [0.0, 0.0, 0.0]
    offsets[rare] = 40.0
    update_bundle(bundle, {"decision": {**p.bundle.manifest["decision"],
                                        "prior_correction": offsets}},
                  note="test: forced prior correction", out=forced)
    got = _answers(forced, imbalanced_folder, paths, tmp_path / "b")
    assert got == {k: [rare] * len(paths) for k in ("torch", "onnx", "cli", "http")}


# --- auto keeps the correction only when it does not lower validation balanced accuracy

def _one_feature_set(n_major: int, n_minor: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping classes on one feature: N(-1, 1) (class 0, the majority) and N(+1, 1)
    (class 1); the equal-prior (balanced accuracy) boundary is x = 0."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-1, 1, n_major), rng.normal(1, 1, n_minor)])
    y = np.repeat([0, 1], [n_major, n_minor])
    return x.reshape(-1, 1).astype(np.float32), y


def _model(bias: float) -> torch.nn.Module:
    """Logits (-x + bias, x - bias): log-odds 2x - 2 bias. bias 0: the posterior at equal
    priors already (what a model trained on balanced data, or with full class weights,
    learns); bias log(5)/2: the posterior at the 5:1 training prior."""
    net = torch.nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        net.bias.copy_(torch.tensor([bias, -bias]))
    return net


def _calibrated(bias: float, requested: str, **kw):
    """calibrate_run on a 5:1 set with the loss plan of a plain loss selected by balanced
    accuracy (offsets -log prior: the minority raised by log 5 against the majority)."""
    from imgtriage.evaluate import DecisionPolicy

    xt, yt = _one_feature_set(500, 100, 0)
    xv, yv = _one_feature_set(500, 100, 1)
    cfg = tiny_cfg(loss_strategy="none", select_metric="val_balanced_accuracy",
                   prior_correction=requested, **kw)
    plan = plan_loss(cfg, yt, 2)
    assert plan.prior_offsets is not None
    model = _model(bias)
    cal = calibrate_run(model, ArraySource(xt, yt), ArraySource(xv, yv), ["major", "minor"],
                        cfg, plan)
    with torch.no_grad():
        logits = model(torch.from_numpy(xv)).numpy()
    said = cal.summary["prior_correction"]
    return cal, said, DecisionPolicy.from_dict(cal.decision).decide(logits).class_id, yv


def test_auto_drops_a_correction_that_lowers_balanced_accuracy():
    cal, said, decided, y = _calibrated(0.0, "auto")  # already balanced: correcting overshoots
    ba = {k: said[k]["balanced_accuracy"] for k in ("plain", "corrected")}
    assert ba["corrected"] < ba["plain"] - 0.02
    assert cal.decision["prior_correction"] is None and said["dropped"] is True
    assert said["applied"] is False and said["why"] == "it lowered validation balanced accuracy"
    assert said["behaviour"] == "decides and reports probabilities at the training prior"
    assert list(said["offsets"]) == ["major", "minor"] and "a tie keeps it" in said["rule"]
    assert said["line"].startswith("prior correction dropped") and said["line"] in cal.line
    assert "--prior-correction on" in said["line"]
    # the rule was refitted without it: it decides the plain argmax (x > 0 is "minor")
    x = _one_feature_set(500, 100, 1)[0][:, 0]
    assert (decided == (x > 0)).all()
    assert np.mean(decided == y) == pytest.approx(said["plain"]["accuracy"])


def test_auto_keeps_a_correction_that_helps():
    cal, said, decided, y = _calibrated(np.log(5) / 2, "auto")  # decides at the 5:1 prior
    ba = {k: said[k]["balanced_accuracy"] for k in ("plain", "corrected")}
    assert ba["corrected"] > ba["plain"] + 0.03
    assert said["applied"] is True and said["dropped"] is False and "warning" not in said
    assert cal.decision["prior_correction"] == pytest.approx(list(said["offsets"].values()))
    assert "kept: it does not lower validation balanced accuracy" in cal.line
    assert np.mean(decided == y) == pytest.approx(said["corrected"]["accuracy"])


def test_a_tie_keeps_the_correction():
    from imgtriage.evaluate import DecisionPolicy
    from imgtriage.train.calibrate import prior_summary

    cfg = tiny_cfg(loss_strategy="none", select_metric="val_balanced_accuracy")
    plan = plan_loss(cfg, np.repeat([0, 1], [50, 10]), 2)
    logits = np.array([[9.0, -9.0], [8.0, -8.0], [-9.0, 9.0]])  # far from any boundary
    said = prior_summary(logits, np.array([0, 0, 1]),
                         DecisionPolicy(prior_correction=plan.prior_offsets), ["a", "b"], plan,
                         "auto")
    assert said["plain"] == said["corrected"] and said["applied"] is True


def test_an_explicit_correction_stays_with_a_warning():
    cal, said, _, _ = _calibrated(0.0, "on")
    assert said["applied"] is True and cal.decision["prior_correction"] is not None
    assert said["corrected"]["balanced_accuracy"] < said["plain"]["balanced_accuracy"]
    assert "lowers validation balanced accuracy" in said["warning"]
    assert f"warning: {said['warning']}" in cal.line


def test_without_calibration_auto_still_checks_the_correction():
    cal, said, _, _ = _calibrated(0.0, "auto", calibrate=False)
    assert cal.decision["prior_correction"] is None and said["dropped"] is True
    assert cal.decision["temperature"] == 1.0 and cal.decision["abstain"] is False
    assert "prior correction dropped" in cal.line
    cal, said, _, _ = _calibrated(np.log(5) / 2, "auto", calibrate=False)
    assert said["applied"] is True and cal.decision["prior_correction"] is not None
