"""The report scores what the decision rule answers: recall-first positive class, abstentions
in their own column, and the failure gallery of the rule (not of the top class)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgtriage.evaluate import DecisionPolicy, build_report, decision_outcomes, write_report

NAMES = ["safe", "unsafe"]


def _probs_logits(p_unsafe):
    p = np.array([[1 - u, u] for u in p_unsafe])
    return np.log(p)


def test_recall_first_rule_changes_answers_and_counts():
    # 4 unsafe (p_unsafe 0.9, 0.3, 0.15, 0.05) and 4 safe (0.02, 0.1, 0.25, 0.6)
    z = _probs_logits([0.9, 0.3, 0.15, 0.05, 0.02, 0.1, 0.25, 0.6])
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    paths = [f"f{i}.png" for i in range(8)]
    rule = DecisionPolicy(thresholds=(0.0, 0.2), positive_class=1)
    out = decision_outcomes(rule.decide(z), y, NAMES, paths)
    assert out["confusion_matrix"] == [[2, 2, 0], [2, 2, 0]]  # rows: true; last col: unknown
    unsafe = out["per_class"][1]
    assert (unsafe["recall"], unsafe["missed"], unsafe["abstained"]) == (0.5, 2, 0)
    assert out["per_class"][1]["precision"] == 0.5  # two false alarms (0.25, 0.6)
    assert out["coverage"] == 1.0 and out["errors"] == 4
    missed = out["failures"]["per_class"][1]["false_negatives"]
    assert [m["path"] for m in missed] == ["f3.png", "f2.png"]  # below 0.2, surest first
    # the threshold-free metrics score the top class: three misses there
    argmax = build_report(logits=z, labels=y, class_names=NAMES, paths=paths)
    assert argmax["metrics"]["per_class"][1]["recall"] == 0.25
    assert argmax["decision"] is None


def test_abstentions_form_their_own_column_and_are_never_failures():
    z = _probs_logits([0.9, 0.3, 0.15, 0.05, 0.02, 0.1, 0.25, 0.6])
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    # unsafe when p_unsafe >= 0.2; safe only when p_safe >= 0.92; else review
    rule = DecisionPolicy(thresholds=(0.92, 0.2), positive_class=1, abstain=True)
    r = build_report(logits=z, labels=y, class_names=NAMES, paths=[str(i) for i in range(8)],
                     decision=rule)
    d = r["decision"]
    assert d["columns"] == ["safe", "unsafe", "unknown"]
    assert d["confusion_matrix"] == [[1, 2, 1], [1, 2, 1]]
    assert d["abstain_count"] == 2 and d["coverage"] == pytest.approx(0.75)
    assert (d["per_class"][1]["missed"], d["per_class"][1]["abstained"]) == (1, 1)
    missed = d["failures"]["per_class"][1]["false_negatives"]
    assert [m["path"] for m in missed] == ["3"]  # 0.15 went to review: not a miss
    assert sum(map(sum, d["confusion_matrix"])) == d["n_samples"] == 8
    assert d["rule"]["positive_class"] == 1


def test_html_shows_the_rule_matrix_and_its_gallery(tmp_path):
    paths = []
    for i in range(8):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((12, 12), 30 * i, dtype=np.uint8)).save(f)
        paths.append(str(f))
    z = _probs_logits([0.9, 0.3, 0.15, 0.05, 0.02, 0.1, 0.25, 0.6])
    rule = DecisionPolicy(thresholds=(0.0, 0.2), positive_class=1)
    write_report(tmp_path / "out", logits=z, labels=[1, 1, 1, 1, 0, 0, 0, 0],
                 class_names=NAMES, paths=paths, decision=rule)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Answers under the decision rule" in page
    assert "Failure gallery under the rule" in page
    gallery = page.split("Failure gallery under the rule", 1)[1]
    assert "img2.png" in gallery and "img3.png" in gallery  # the misses under the rule
    assert "data:image/png;base64," in gallery  # with thumbnails
