"""Selecting by balanced accuracy decides at equal class priors (logit adjustment), and the
bundle carries that correction, so every way of asking gives the same answers."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.predict import Predictor
from imgtriage.train.losses import prior_offsets
from imgtriage.train.run import train

from .conftest import tiny_cfg


@pytest.fixture(scope="module")
def balanced_run(imbalanced_folder, tmp_path_factory):
    """The 24 / 10 / 4 digits trained with the recipe --model auto picks for imbalanced
    classes (square-root class weights, best epoch by balanced accuracy)."""
    cfg = tiny_cfg(loss_strategy="class_weights", select_metric="val_balanced_accuracy",
                   epochs=3)
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


def test_accuracy_selection_keeps_the_data_prior(imbalanced_folder, tmp_path):
    res = train(imbalanced_folder, tmp_path, tiny_cfg(epochs=1), quiet=True)
    m = load_bundle(res.bundle_path).manifest
    assert m["decision"]["prior_correction"] is None
    said = json.loads((tmp_path / "run.json").read_text())["prior_correction"]
    assert said["applied"] is False and "val_accuracy" in said["why"]
    assert said["behaviour"] == "decides and reports probabilities at the training prior"


def test_the_correction_stays_without_calibration(imbalanced_folder, tmp_path):
    cfg = tiny_cfg(epochs=1, calibrate=False, select_metric="val_balanced_accuracy")
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
