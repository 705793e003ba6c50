"""The observatory recipe (examples/observatory), reduced: 16 crops per class of at most 96 px,
two epochs at 32 px, one thread.

It runs the recipe's own ``main`` on the real FITS frames (../shared/datasets/fits-samples and
Debian's eso-midas-testdata; skipped cleanly when either is absent) and checks that its outputs
exist and agree: the crops and manifest, metrics in range, both decision profiles in a bundle
that loads, every inbox file answered exactly once (broken FITS in the defect log), and the
Celery task classifying only the files that arrived after its first run.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from shared_helpers import REPO, shared_dataset

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def load_recipe():
    spec = importlib.util.spec_from_file_location("observatory_run",
                                                  REPO / "examples" / "observatory" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    fits_samples = shared_dataset("fits-samples")
    midas = sorted(glob.glob("/usr/lib/eso-midas/*/test/prim"))
    if not midas:
        pytest.skip("eso-midas-testdata is not installed (`make system-deps` installs it)")
    pytest.importorskip("celery")
    out = tmp_path_factory.mktemp("observatory") / "out"
    summary = load_recipe().main(["--fits-samples", str(fits_samples), "--midas", midas[-1],
                                  "--out", str(out), "--crops-per-class", "16", "--max-crop",
                                  "96", "--epochs", "2", "--img-size", "32", "--threads", "1"])
    return out, summary


def test_crops_and_manifest_are_complete_and_balanced(recipe):
    out, s = recipe
    with (out / "data" / "frames.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all((out / "data" / r["path"]).is_file() for r in rows)
    assert {r["label"] for r in rows} == {"arc", "flat", "science", "spectrum"}
    for split, want in (("train", 16), ("val", 4), ("test", 4)):
        assert set(s["counts"][split].values()) == {want}
        assert sum(r["split"] == split for r in rows) == 4 * want
    groups = {r["label"]: set() for r in rows}
    for r in rows:
        groups[r["label"]].add(r["group"])
    assert (len(groups["flat"]), len(groups["arc"]), len(groups["spectrum"])) == (3, 2, 2)
    assert 16 <= len(groups["science"]) <= s["training_frames"] - 7  # 16 crops, 17 frames


def test_metrics_are_in_range_and_count_the_test_split(recipe):
    _, s = recipe
    for key in ("test_fusion", "test_image_only", "test_precision_profile",
                "test_recall_profile"):
        m = s[key]
        assert m["n"] == 16
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["balanced_accuracy"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in m["recall"].values())
    for p in ("precision", "recall"):
        d = s[f"test_{p}_profile"]["decision"]
        assert 0.0 <= d["coverage"] <= 1.0
    for model in ("fusion", "image_only"):
        by = s["test_by_header"][model]
        assert by["full"]["n"] + by["stripped"]["n"] == 16


def test_bundle_loads_with_features_and_both_profiles(recipe):
    from imgtriage.predict import Predictor

    out, s = recipe
    p = Predictor.load(out / "run_fusion" / "bundle")
    assert p.features is not None and "ESO DPR TYPE__missing" in p.features.feature_names_
    profiles = p.bundle.manifest["profiles"]
    assert set(profiles) >= {"precision", "recall"}
    assert p.bundle.manifest["decision"] == profiles["precision"]  # the default rule
    assert p.policy.abstain
    assert set(s["profiles"]["precision"]["thresholds"]) == set(p.classes)


def test_every_inbox_file_is_answered_once_and_broken_fits_are_defects(recipe):
    out, s = recipe
    inbox = s["inbox"]
    report = json.loads((out / "inbox_report.json").read_text())
    paths = [r["path"] for r in report["results"]] + [d["path"] for d in report["defects"]]
    assert len(paths) == len(set(paths)) == inbox["files"]
    assert inbox["defect_log_rows"] == inbox["defects"] == len(report["defects"])
    broken = {"truncated_hbo.fits", "empty.fits", "garbage.fits", "header_only.fits",
              "3Dtable.tfits", "xspectr.fits", "nttexample.mt"}
    assert set(inbox["defect_issues"]) == broken
    assert inbox["flagged"]["cut_late_hbo.fits"] == ["partial"]  # read from the rows it has
    assert all(r["class"] in {"arc", "flat", "science", "spectrum", "unknown"}
               for r in report["results"])
    assert report["meta"]["num_files"] == inbox["files"]
    assert 0.0 <= report["meta"]["coverage"] <= 1.0


def test_celery_task_classifies_only_new_arrivals(recipe):
    _, s = recipe
    c = s["celery"]
    assert c["first_run_files"] == s["inbox"]["files"]
    assert c["second_run_files"] == 2 and c["second_run_skipped"] == c["first_run_files"]
    assert all(Path(n).name.startswith("new_") for n in c["second_run_answers"])
