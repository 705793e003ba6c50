"""write_report on tiny arrays with real image files (and one broken one)."""

from __future__ import annotations

import base64
import html
import json
import re

import numpy as np
import pytest
from PIL import Image

from imgtriage.evaluate import ConformalPredictor, DecisionPolicy, softmax, write_report
from imgtriage.evaluate._gallery import thumbnail, to_uint8

NAMES = ["cat", "dog & co", "<owl>"]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
MISTAKES = {1: 1, 5: 2, 9: 0, 10: 1}  # sample -> predicted class


def _logits() -> np.ndarray:
    z = np.full((len(LABELS), 3), -1.0)
    z[np.arange(len(LABELS)), LABELS] = 2.0
    for i, pred in MISTAKES.items():
        z[i] = -1.0
        z[i, pred] = 3.0 + i / 10  # confident mistakes
    return z


def _images(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(LABELS)):
        p = tmp_path / "imgs" / f"img {i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        if i == 9:
            Image.fromarray((rng.random((40, 30)) * 65535).astype(np.uint16)).save(p)
        elif i == 10:
            Image.fromarray((rng.random((200, 300, 4)) * 255).astype(np.uint8), "RGBA").save(p)
        else:
            Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "imgs" / "broken.png").write_text("this is not a png")
    paths[5] = str(tmp_path / "imgs" / "broken.png")  # one of the mistakes
    return paths


def test_write_report_with_files_and_broken_path(tmp_path):
    pytest.importorskip("imgtriage.io", reason="imgtriage.io not available")
    paths = _images(tmp_path)
    logits = _logits()
    cp = ConformalPredictor("aps", 0.2, randomized=True).fit(softmax(logits, 1.5), LABELS)
    policy = DecisionPolicy(temperature=1.5, thresholds=(0.5, 0.5, 0.9), abstain=True,
                            conformal=cp.to_dict())
    report = write_report(tmp_path / "out", logits=logits, labels=LABELS, class_names=NAMES,
                          paths=paths, decision=policy.to_dict(), title="tiny <report>",
                          extra={"split": "test", "n": np.int64(3)},
                          feature_importance={"mean": 0.4, "std": -0.2, "header:EXPTIME": 0.1})
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    loaded = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert loaded == json.loads(json.dumps(report))
    assert loaded["abstain"]["coverage"] is not None and loaded["conformal"]["coverage"] >= 0
    assert loaded["calibration"]["temperature"] == 1.5
    assert loaded["extra"] == {"split": "test", "n": 3}

    assert "data:image/png;base64," in page
    assert loaded["figures"] == ["confusion_matrix.png", "feature_importance.png",
                                 "pr_curves.png", "reliability.png", "risk_coverage.png"]
    for name in loaded["figures"]:  # each figure is a file beside report.html, as embedded
        png = (tmp_path / "out" / name).read_bytes()
        assert Image.open(tmp_path / "out" / name).size[0] > 100
        assert base64.b64encode(png).decode() in page
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    for i in MISTAKES:
        assert html.escape(paths[i]) in page  # every mistake is in the gallery
    assert "unreadable" in page  # the broken file is a placeholder, not a crash
    cards = re.findall(r'<div class="card">(.*?)</div></div>', page, flags=re.S)
    thumbs = [c for c in cards if '<img src="data:image/png;base64,' in c]
    assert len(thumbs) >= 3  # the three readable mistakes, incl. 16-bit and RGBA files
    assert "&lt;owl&gt;" in page and "<owl>" not in page
    assert "dog &amp; co" in page and "tiny &lt;report&gt;" in page
    assert "Feature importance" in page and "Failure gallery" in page
    pairs = loaded["failures"]["confused_pairs"]
    assert {(p["true"], p["predicted"]) for p in pairs} == {
        ("cat", "dog & co"), ("dog & co", "<owl>"), ("<owl>", "cat"), ("<owl>", "dog & co")}
    fn = loaded["failures"]["per_class"][2]["false_negatives"]
    assert [it["path"] for it in fn] == [paths[10], paths[9]]  # most confident first


def test_write_report_minimal_with_injected_reader(tmp_path):
    calls = []

    def reader(path):
        calls.append(path)
        if path.endswith("bad"):
            raise OSError("disk on fire")
        return np.arange(64, dtype=np.float32).reshape(8, 8)

    paths = [f"p{i}" for i in range(len(LABELS))]
    paths[1] = "p1-bad"
    report = write_report(tmp_path, logits=_logits(), labels=LABELS, class_names=NAMES,
                          paths=paths, image_reader=reader)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert report["abstain"] is None and report["conformal"] is None
    assert "OSError: disk on fire" in page
    assert len(calls) == len(set(calls)) == len(MISTAKES)  # each file read once
    assert page.count('<img src="data:image/png;base64,') >= len(MISTAKES) - 1


def test_to_uint8_and_thumbnail_edge_cases():
    u16 = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    assert to_uint8(u16).tolist() == [[0, 64], [128, 255]]
    f = np.array([[np.nan, 1.0], [2.0, np.inf]])
    assert to_uint8(f).tolist() == [[0, 0], [255, 0]]
    assert to_uint8(np.ones((5, 5, 4))).shape == (5, 5, 3)
    assert to_uint8(np.ones((5, 5, 2))).shape == (5, 5)
    assert to_uint8(np.full((3, 3), 7)).max() == 0
    uri, err = thumbnail("x", lambda p: np.zeros((2, 2, 2, 2)))
    assert uri is None and "shape" in err
    uri, err = thumbnail("x", lambda p: np.random.default_rng(0).random((500, 100)))
    assert err is None and uri.startswith("data:image/png;base64,")


def test_positive_class_profile_shows_one_coverage(tmp_path):
    """Issue 19: under a recall-first profile the abstain section and the decision section
    of report.html showed two coverages (one ignored the positive class)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    logits = rng.normal(size=(200, 2)) + np.eye(2)[labels] * 1.5
    policy = DecisionPolicy(thresholds=(0.8, 0.3), abstain=True, positive_class=1)
    report = write_report(tmp_path, logits=logits, labels=labels, class_names=["safe", "unsafe"],
                          paths=[f"p{i}" for i in range(200)], decision=policy,
                          image_reader=lambda p: np.zeros((4, 4), np.float32))
    decided = policy.decide(logits)
    assert report["abstain"]["coverage"] == report["decision"]["coverage"] == pytest.approx(
        1 - decided.abstained.mean())
    assert report["abstain"]["abstain_count"] == int(decided.abstained.sum()) > 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    shown = set(re.findall(r'<td class="l">coverage</td><td class="">([0-9.]+)</td>', page))
    assert len(shown) == 1, shown


def test_a_prior_corrected_report_scores_its_labels_and_reports_plain_probabilities():
    """Under a prior correction the label metrics are those of the rule's equal-prior
    argmax and the probability metrics those of softmax(logits / T), what the rows report."""
    from imgtriage.evaluate import build_report
    from imgtriage.evaluate.metrics import balanced_accuracy, negative_log_likelihood

    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.2).astype(int)
    z = np.stack([np.zeros(400), 1.5 * (rng.normal(size=400) + 1.5 * y) - 3.0], axis=1)
    policy = DecisionPolicy(temperature=1.3, prior_correction=(-0.7, 0.7))
    r = build_report(logits=z, labels=y, class_names=["safe", "unsafe"],
                     paths=[f"{i}.png" for i in range(400)], decision=policy)
    decided = policy.decide(z)
    assert r["metrics"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy(decided.decision_probs, y))
    assert r["metrics"]["balanced_accuracy"] != pytest.approx(balanced_accuracy(decided.probs, y))
    assert r["metrics"]["confusion_matrix"]["counts"][1][1] == int(
        ((decided.class_id == 1) & (y == 1)).sum())
    assert r["metrics"]["nll"] == pytest.approx(negative_log_likelihood(softmax(z, 1.3), y))
    assert r["meta"]["priors"] == ("decides at equal class priors; reports probabilities at "
                                   "the training prior")
