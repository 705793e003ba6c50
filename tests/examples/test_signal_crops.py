"""The signal-crops recipe (examples/signal-crops/run.py), reduced: 48 px crops of a few MSTAR
chips per class, one epoch per label budget, 4 test chips per class."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image

from shared_helpers import REPO, shared_dataset

pytestmark = [pytest.mark.shared, pytest.mark.slow]

SCRIPT = REPO / "examples" / "signal-crops" / "run.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_signal_crops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _in_unit(x) -> bool:
    return x is not None and 0.0 <= x <= 1.0


def _coherent(t: dict, files: int) -> None:
    assert t["files"] == files and t["defects"] == 0
    assert _in_unit(t["accuracy"]) and _in_unit(t["coverage"]) and t["files_per_s"] > 0
    assert all(_in_unit(v) for v in t["recall"].values())


def test_reduced_recipe_is_coherent(tmp_path):
    from imgtriage.bundle import load_bundle
    from imgtriage.predict import Predictor

    mstar = shared_dataset("mstar-soc10")
    recipe = _recipe()
    out = tmp_path / "out"
    res = recipe.main(["--mstar", str(mstar), "--out", str(out), "--crop", "48",
                       "--train-per-class", "56", "--test-per-class", "4", "--epochs", "1",
                       "--enrol-shots", "3", "--threads", "1", "--unlabeled",
                       "--semi-steps", "2"])
    assert json.loads((out / "results.json").read_text())["runs"][0]["labels"] == 25
    crops = list((out / "crops").rglob("*.png"))
    assert len(crops) == 10 * (56 + 4)
    assert {Image.open(p).size for p in crops[:50]} == {(48, 48)}
    assert {Image.open(p).mode for p in crops[:50]} == {"L"}
    known = res["known_classes"]
    assert len(known) == 9 and "ZSU234" not in known
    # --model auto: the Siamese model under 300 labels (issue 19's measurement), deep_cnn at 500
    assert [(r["labels"], r["model"]) for r in res["runs"]] == [
        (25, "siamese"), (100, "siamese"), (500, "deep_cnn")]
    for r in res["runs"]:
        lines = (out / f"labels-{r['labels']}.csv").read_text().splitlines()
        assert len(lines) == 1 + r["labels"]
        assert f"{r['labels']} training labels" in r["model_choice"]
        _coherent(r["test"], 9 * 4)
        assert set(r["test"]["recall"]) == set(known)
        assert Predictor.load(r["bundle"]).classes == sorted(known)
        # --unlabeled: the same small CNN without and with the other known train crops
        semi = r["semi"]
        assert semi["unlabeled"] == 9 * 56 - r["labels"]
        for arm in ("labels", "semi"):
            _coherent(semi[arm]["test"], 9 * 4)
        cfg = json.loads((out / f"run-{r['labels']}-semi" / "config.json").read_text())
        assert cfg["unlabeled"].endswith(f"unlabeled-{r['labels']}")
    # budgets are nested: the 25 labelled crops are among the 100
    small = set((out / "labels-25.csv").read_text().splitlines()[1:])
    assert small <= set((out / "labels-100.csv").read_text().splitlines()[1:])
    # the gallery enrolled the new class without retraining
    g = res["gallery"]
    assert g["encoder_unchanged"]
    assert g["classes"]["ZSU234"] == 3 and sum(g["classes"].values()) == 25 + 3
    _coherent(g["known_classes_before"], 9 * 4)
    _coherent(g["all_classes_after"], 10 * 4)
    _coherent(g["new_class_only_after"], 4)
    assert sorted(g["by_budget"], key=int) == ["25", "100", "500"]
    for t in g["by_budget"].values():
        _coherent(t, 9 * 4)
    assert g["by_budget"]["25"]["accuracy"] == g["known_classes_before"]["accuracy"]
    before, after = load_bundle(g["bundle"]), load_bundle(g["enrolled_bundle"])
    assert "ZSU234" not in before.classes and "ZSU234" in after.classes
    assert Predictor.load(g["enrolled_bundle"]).classes == after.classes
