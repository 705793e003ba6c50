"""The safe-unsafe recipe (examples/safe-unsafe), reduced: 100 tiles, two epochs at 48 px
(the first with the backbone frozen), transfer learning from a local weights file (random
weights in timm's layout here: there are no real ones offline).

It runs the recipe's own ``main`` and checks that its outputs exist and agree: every test file
answered once, the recall-first threshold meets its target on validation, the rule's confusion
matrix and failure gallery are in the HTML report, and the review queue matches the report.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from shared_helpers import REPO, shared_dataset

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def load_recipe():
    spec = importlib.util.spec_from_file_location("safe_unsafe_run",
                                                  REPO / "examples" / "safe-unsafe" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    data = shared_dataset("magnetic-tile")
    tmp = tmp_path_factory.mktemp("safe-unsafe")
    import timm
    from safetensors.torch import save_file

    weights = tmp / "resnet18.safetensors"  # laid out like timm's ImageNet weights (3 ch)
    net = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    out = tmp / "out"
    summary = load_recipe().main(["--data", str(data), "--out", str(out), "--max-safe", "40",
                                  "--max-per-defect", "12", "--epochs", "2", "--img-size", "48",
                                  "--threads", "1", "--pretrained", str(weights),
                                  "--backbone", "resnet18"])
    return out, summary


def test_every_tile_is_split_and_every_test_file_answered_once(recipe):
    _, s = recipe
    total = sum(s["counts"].values())
    assert s["counts"]["Free"] == 40 and total == 40 + 12 * 5
    assert sum(s["split_sizes"].values()) == total
    q, n_test = s["review_queue"], s["split_sizes"]["test"]
    assert q["files"] == q["results"] + q["defects"] == n_test and q["defects"] == 0
    assert sum(k["n"] for k in q["per_kind"].values()) == n_test
    for k in q["per_kind"].values():
        assert k["n"] == k["safe"] + k["unsafe"] + k["review"]
    for rule in ("test_recall_rule", "test_review_rule"):
        assert sum(map(sum, s[rule]["confusion_matrix"]["counts"])) == n_test


def test_transfer_learning_with_class_weights_was_used(recipe):
    out, s = recipe
    assert s["model"] == "resnet18" and s["note"].startswith("transfer learning")
    cfg = json.loads((out / "run" / "config.json").read_text())
    assert cfg["pretrained"].endswith("resnet18.safetensors") and cfg["in_chans"] == 1
    assert cfg["loss_strategy"] == "class_weights"
    n_safe = s["counts"]["Free"]
    n_unsafe = sum(s["counts"].values()) - n_safe
    w = s["class_weights"]  # the minority weighs more (here unsafe is the majority: 60 vs 40)
    assert (w["unsafe"] > w["safe"]) == (n_unsafe < n_safe)


def test_recall_first_threshold_meets_its_target_on_validation(recipe):
    from imgtriage.bundle import load_bundle

    out, s = recipe
    b = load_bundle(out / "run" / "bundle")  # verifies hashes
    m = b.manifest
    assert set(m["profiles"]) >= {"recall", "pass", "review"}
    unsafe = b.classes.index("unsafe")
    assert m["decision"]["positive_class"] == unsafe and not m["decision"]["abstain"]
    achieved = m["calibration"]["recall"]["thresholds"]["achieved"][unsafe]
    assert achieved["met"] and achieved["recall"] >= 0.95
    assert m["profiles"]["review"]["abstain"] is True
    assert m["profiles"]["review"]["thresholds"][unsafe] == pytest.approx(s["thresholds"]["unsafe"])
    assert all(0.0 <= t <= 1.0 for t in s["thresholds"].values())


def test_metrics_in_range_and_review_queue_matches_the_report(recipe):
    _, s = recipe
    rec, rev = s["test_recall_rule"], s["test_review_rule"]
    assert rec["coverage"] == 1.0 and rec["abstained"] == 0  # the recall rule never abstains
    for rule in (rec, rev):
        for v in (rule["accuracy"], rule["coverage"]):
            assert 0.0 <= v <= 1.0
        for c in rule["per_class"].values():
            assert c["recall"] is None or 0.0 <= c["recall"] <= 1.0
    assert 0.0 <= s["test_top_class"]["accuracy"] <= 1.0
    # the same rule applied by `predict --profile review` and by `evaluate --profile review`
    assert abs(s["review_queue"]["to_review"] - rev["abstained"]) <= 1
    assert len(rec["missed_unsafe"]) <= rec["per_class"]["unsafe"]["missed"]


def test_reports_show_the_rule_matrix_and_missed_defects(recipe):
    out, s = recipe
    for name in ("eval-recall", "eval-review"):
        page = (out / name / "report.html").read_text()
        assert "Answers under the decision rule" in page
        assert "Failure gallery under the rule" in page and "Confusion matrix" in page
        for png in ("confusion_matrix.png", "pr_curves.png", "reliability.png"):
            assert (out / name / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # beside it
    page = (out / "eval-recall" / "report.html").read_text()
    for path in s["test_recall_rule"]["missed_unsafe"]:
        assert path in page.split("Failure gallery under the rule", 1)[1]


def test_without_weights_the_recipe_says_it_trains_from_scratch():
    mod = load_recipe()
    flags, note = mod.model_args(mod.parse_args(["--pretrained", "none"]))
    assert "--pretrained" not in flags and flags[flags.index("--model") + 1] == "crop_cnn"
    assert note.startswith("NOTE: --pretrained none given") and "from scratch" in note
    assert json.loads(flags[flags.index("--model-kwargs") + 1]) == {"global_pool": "avg"}
    flags, _ = mod.model_args(mod.parse_args(["--scratch-pool", "max", "--pretrained", "none"]))
    assert json.loads(flags[flags.index("--model-kwargs") + 1]) == {"global_pool": "max"}
    flags, note = mod.model_args(mod.parse_args(["--pretrained", "w.safetensors"]))
    assert flags[:4] == ["--model", "efficientnet_lite0", "--pretrained", "w.safetensors"]


def test_freeze_backbone_trains_the_head_only_with_weights():
    mod = load_recipe()
    flags, note = mod.model_args(mod.parse_args(["--pretrained", "w.safetensors",
                                                 "--freeze-backbone"]))
    assert "--freeze-backbone" in flags and "--freeze-epochs" not in flags
    assert "head only" in note
    from imgtriage.cli.train_cmd import train_command  # the flag exists on `imgtriage train`

    names = [p.default.param_decls for p in train_command.__signature__.parameters.values()
             if hasattr(p.default, "param_decls")]
    assert any("--freeze-backbone" in str(n) for n in names)


def test_by_default_the_recipe_uses_the_installed_weights_or_says_how_to_get_them(
        monkeypatch):
    from imgtriage.models import pretrained

    mod = load_recipe()
    flags, note = mod.model_args(mod.parse_args([]))
    if pretrained.get_weights("efficientnet_lite0").path() is not None:
        assert flags[:4] == ["--model", "efficientnet_lite0", "--pretrained", "auto"]
        assert "--freeze-backbone" in flags and note.startswith("transfer learning")
    monkeypatch.setattr(type(pretrained.get_weights("efficientnet_lite0")), "path",
                        lambda self: None)
    flags, note = mod.model_args(mod.parse_args([]))
    assert flags[flags.index("--model") + 1] == "crop_cnn"
    assert "pip install 'imgtriage[pretrained]'" in note
