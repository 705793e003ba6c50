"""--model auto at the label counts the signal-lab recipe uses: 25 / 100 / 500 labels."""

from __future__ import annotations

import doctest
import itertools
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from imgtriage.train import auto
from imgtriage.train.auto import ImageProbe, choose_model, probe_images

PROBE = ImageProbe(1, (64, 64), 32)


def _spread(total: int, classes: int = 9) -> dict[str, int]:
    """``total`` labels spread as evenly as possible over ``classes`` classes."""
    return {f"c{i}": total // classes + (i < total % classes) for i in range(classes)}


@pytest.mark.parametrize(("total", "model"), [(25, "siamese"), (100, "siamese"),
                                              (200, "siamese"), (299, "siamese"),
                                              (300, "crop_cnn"), (499, "crop_cnn"),
                                              (500, "deep_cnn"), (2000, "deep_cnn")])
def test_label_budget_picks_the_model(total, model):
    choice = choose_model(_spread(total), PROBE)
    assert choice.model == model
    assert f"{total} training labels" in choice.reason


def test_few_shot_reason_cites_the_measurement():
    # issue 19: the Siamese model beat crop_cnn at 100 and 200 labels (bench_auto_switch.py)
    why = choose_model(_spread(200), PROBE).reason
    assert "fewer than 300 labels or 30 per class" in why
    assert "bench/bench_auto_switch.py" in why and "100 and 200 labels" in why


def test_few_per_class_keeps_the_siamese_model_above_300_labels():
    counts = {**_spread(280, 4), **{f"r{i}": 20 for i in range(5)}}  # median 20 per class
    assert sum(counts.values()) == 380
    assert choose_model(counts, PROBE).model == "siamese"


def test_few_per_class_stays_shallow_even_with_500_labels():
    counts = {**_spread(300, 4), **{f"r{i}": 40 for i in range(5)}}  # median 40 per class
    assert sum(counts.values()) == 500
    assert choose_model(counts, PROBE).model == "crop_cnn"


def test_small_images_keep_crop_cnn_at_500_labels():
    assert choose_model(_spread(500), ImageProbe(1, (32, 32), 32)).model == "crop_cnn"


def test_docstring_examples():
    assert doctest.testmod(auto, raise_on_error=False).failed == 0


# --- the whole recipe (train/auto_recipe.py) ----------------------------------------------

def test_grey_images_use_the_pretrained_backbone_only_when_large():
    big, crops = ImageProbe(1, (300, 280), 32), ImageProbe(1, (64, 64), 32)
    counts = {"ok": 1300, "bad": 650}
    choice = choose_model(counts, big, pretrained=True)
    assert choice.pretrained and choice.in_chans == 3 and "replicated" in choice.reason
    assert choose_model(counts, crops, pretrained=True).model == "deep_cnn"
    assert not choose_model(counts, big, pretrained=False).pretrained


def test_imbalance_turns_on_class_weights_and_balanced_selection():
    from imgtriage.train.auto_recipe import Costs, plan_recipe
    from imgtriage.train.config import TrainConfig

    cheap = Costs(0.001, 0.002)
    cfg, why = plan_recipe(TrainConfig(model="deep_cnn"), {"ok": 900, "bad": 300}, 100,
                           pretrained=False, rgb_photos=False, costs=cheap)
    assert (cfg.loss_strategy, cfg.select_metric) == ("class_weights", "val_balanced_accuracy")
    assert "imbalanced 3.0:1" in why
    given = TrainConfig(model="deep_cnn", loss_strategy="focal")
    cfg, _ = plan_recipe(given, {"ok": 900, "bad": 300}, 100, pretrained=False,
                         rgb_photos=False, costs=cheap)
    assert cfg.loss_strategy == "focal" and cfg.select_metric == "val_balanced_accuracy"
    cfg, why = plan_recipe(TrainConfig(model="deep_cnn"), {"a": 500, "b": 450}, 100,
                           pretrained=False, rgb_photos=False, costs=cheap)
    assert cfg.loss_strategy == "none" and "imbalanced" not in why


@pytest.mark.parametrize(("budget", "finetune"), [(15.0, True), (0.5, False)])
def test_time_budget_decides_fine_tuning(budget, finetune):
    from imgtriage.train.auto_recipe import Costs, plan_recipe
    from imgtriage.train.config import TrainConfig

    cfg = TrainConfig(model="efficientnet_lite0", img_size=224, time_budget=budget)
    # 5,000 images: embedding ~28 s, a fine-tuning epoch ~110 s at every side (side None)
    got, why = plan_recipe(cfg, {"a": 2500, "b": 2500}, 500, pretrained=True,
                           rgb_photos=True, costs=Costs(0.005, 0.02))
    assert "embedding 5500 images once ~28s" in why
    if finetune:
        assert got.freeze_epochs == 1 and 2 <= got.epochs <= 13 and got.augment == "light"
        assert got.modality == "photo" and not got.freeze_backbone
        assert got.schedule == "cosine" and got.label_smoothing > 0 and got.layer_decay < 1
        assert got.ema_decay == 0.99 and "weight average 0.99" in why
    else:
        assert got.freeze_backbone and got.epochs == cfg.epochs and "head on cached" in why
        assert got.img_size == 224


def test_finetune_sides_follow_the_source_images():
    from imgtriage.train.auto_recipe import SOURCE_UPSCALE, finetune_sides

    for native in (224, 240, 260):
        for source in (8, 32, 48, 64, 300, None):
            sides = finetune_sides(native, source)
            assert sides and sides == sorted(sides) and max(sides) <= native
            if source and SOURCE_UPSCALE * source >= min(sides):
                assert max(sides) <= SOURCE_UPSCALE * source
    assert max(finetune_sides(224, 32)) < 224 <= max(finetune_sides(224, 300))


def test_plan_finetune_uses_more_time_for_more_pixels_or_epochs():
    from imgtriage.train.auto_recipe import (
        MAX_FINETUNE_EPOCHS,
        MIN_FINETUNE_EPOCHS,
        Costs,
        plan_finetune,
    )

    costs = Costs(1 / 250, 1 / 46, 160)  # EfficientNet-Lite0 at 160 px on 2 quiet cores
    sides = [96, 128, 160, 192, 224]
    plans = [plan_finetune(4250, 750, costs, m * 60, sides) for m in (3, 8, 15, 30, 120)]
    for small, big in itertools.pairwise(plans):
        assert (big.side, big.epochs) >= (small.side, small.epochs)
    for m, p in zip((3, 8, 15, 30, 120), plans, strict=True):
        assert 0 <= p.epochs <= MAX_FINETUNE_EPOCHS
        if p.epochs:
            assert p.total_s <= m * 60
        if p.side > min(sides):
            assert p.epochs >= MIN_FINETUNE_EPOCHS
    assert plans[-1].side == 224 and plans[2].side < 224  # 15 min: not 224 px for CIFAR
    scaled = costs.at(80)
    assert scaled.train * 4 == pytest.approx(costs.train) and scaled.side == 80


def test_small_photos_train_below_the_weights_size_unless_given():
    from imgtriage.train.auto_recipe import SOURCE_UPSCALE, Costs, plan_recipe
    from imgtriage.train.config import TrainConfig

    counts = {f"c{i}": 425 for i in range(10)}
    costs = Costs(1 / 250, 1 / 46, 160)
    cfg = TrainConfig(model="efficientnet_lite0", img_size=224)
    got, why = plan_recipe(cfg, counts, 750, pretrained=True, rgb_photos=True, costs=costs,
                           source_side=24)
    assert got.img_size <= 24 * SOURCE_UPSCALE and got.epochs >= 2 and "median side 24" in why
    big, _ = plan_recipe(cfg, counts, 750, pretrained=True, rgb_photos=True, costs=costs,
                         source_side=400)
    assert big.img_size > got.img_size
    kept, _ = plan_recipe(cfg, counts, 750, pretrained=True, rgb_photos=True, costs=costs,
                          source_side=32, size_given=True)
    assert kept.img_size == 224


def test_stage_cache_plan_counts_its_one_pass_and_says_so():
    from imgtriage.train.auto_recipe import (
        STAGE_CACHE_STAGES,
        Costs,
        plan_finetune,
        plan_recipe,
        stage_cache_planned,
    )
    from imgtriage.train.config import TrainConfig

    plain = Costs(1 / 250, 1 / 46, 160)
    cached = Costs(1 / 250, 1 / 46, 160, stem=1 / 300)
    a = plan_finetune(4250, 750, plain, 900, [160])
    b = plan_finetune(4250, 750, cached, 900, [160])
    assert a.cache_s == 0 and b.cache_s == pytest.approx((2 * 4250 + 750) / 300)
    assert b.total_s <= 900 and b.epochs <= a.epochs
    counts = {f"c{i}": 425 for i in range(10)}
    cfg = TrainConfig(model="efficientnet_lite0", img_size=224)
    got, why = plan_recipe(cfg, counts, 750, pretrained=True, rgb_photos=True, costs=cached,
                           source_side=32)
    assert got.freeze_stages == STAGE_CACHE_STAGES and "cached (--stage-cache)" in why
    assert "once per image and mirror" in why
    got, why = plan_recipe(cfg, counts, 750, pretrained=True, rgb_photos=True, costs=plain,
                           source_side=32)
    assert got.freeze_stages == 2 and "--stage-cache" not in why
    assert stage_cache_planned(cfg)
    assert not stage_cache_planned(TrainConfig(stage_cache="off"))
    # d4 flips are not cached; without augmentation nothing is mirrored
    assert not stage_cache_planned(TrainConfig(augment="light", modality="sar"))
    assert stage_cache_planned(TrainConfig(augment="none", modality="sar"))


def test_the_fixed_part_is_planned_from_what_it_is_made_of():
    from imgtriage.train.auto_recipe import Costs, fixed_plan, plan_scratch

    # 300 small grey images, a tiny CNN: a flat 90 s was planned where ~10 s were spent
    small = Costs(1e-3, 2e-2, 32, probe_s=1.5, decode=5e-4)
    f = fixed_plan(300, 60, small)
    parts = f.to_dict()
    assert f.total < 20 and parts["probe"] == 1.5 and parts["decode"] == pytest.approx(0.18)
    assert f.total == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.3)
    # it grows with the data, the model's cost, and counts decoding twice when fine-tuning
    big = Costs(1 / 90, 1 / 60, 160, probe_s=15.0, decode=3e-4)
    assert fixed_plan(5000, 1000, big).total > fixed_plan(1000, 200, big).total > f.total
    tuned = fixed_plan(5000, 1000, big, finetune=True)
    assert tuned.decode == pytest.approx(2 * 6000 * 3e-4) and tuned.after < fixed_plan(
        5000, 1000, big).after  # its end pass over train + val is counted as a pass
    # a 2-minute budget on that small set: the epochs that fit in what is left
    plan = plan_scratch(300, 60, [(32, None, small)], 120)
    assert plan.total_s <= 120 * 0.9 and plan.fixed == f
    assert plan.epochs > (120 * 0.9 - 90) // plan.epoch_s  # more than a flat 90 s let fit
    assert (120 * 0.9 - plan.total_s) < plan.epoch_s  # and no more than fit


def test_measure_costs_times_a_real_model():
    from imgtriage.train.auto_recipe import measure_costs
    from imgtriage.train.config import TrainConfig

    cfg = TrainConfig(model="crop_cnn", img_size=16, in_chans=1, batch_size=8)
    c = measure_costs(cfg, 3, reps=1)
    assert c.side == 16 and c.infer > 0 and c.train > 0 and 0 < c.share < 4  # CPU share
    assert c.probe_s > 0 and c.at(32).probe_s == c.probe_s  # the probe's own seconds
    assert measure_costs(cfg, 3, side=32, reps=1).side == 32


def test_probe_cost_is_the_typical_step_not_a_slow_one():
    from imgtriage.train.auto_recipe import step_seconds

    # one step held up by another process must not halve the epochs a plan fits
    assert step_seconds([0.5, 0.5, 3.0]) == 0.5
    assert step_seconds([0.2]) == 0.2


def test_time_budget_sizes_scratch_epochs_only_when_left_at_default():
    from imgtriage.train.auto_recipe import SCRATCH_MAX_EPOCHS, Costs, plan_recipe
    from imgtriage.train.config import TrainConfig

    counts = {"a": 500, "b": 500}
    slow = Costs(0.01, 0.05)  # 1,000 images: ~60 s per epoch
    cfg = TrainConfig(model="crop_cnn", img_size=32, time_budget=10)
    got, why = plan_recipe(cfg, counts, 200, pretrained=False, rgb_photos=False, costs=slow)
    assert 1 <= got.epochs < SCRATCH_MAX_EPOCHS and f"-> {got.epochs} epochs" in why
    assert got.epochs * 60 <= 10 * 60
    cheap, _ = plan_recipe(cfg, counts, 200, pretrained=False, rgb_photos=False,
                           costs=Costs(1e-4, 5e-4))
    assert cheap.epochs == SCRATCH_MAX_EPOCHS
    kept, why = plan_recipe(TrainConfig(model="crop_cnn", img_size=32, time_budget=3,
                                        epochs=20), counts, 200, pretrained=False,
                            rgb_photos=False, costs=slow)
    assert kept.epochs == 20 and "--epochs 20 given: kept (only ~1 fit" in why


def test_scratch_recipe_robust_scaling_for_grey_and_deep_images_not_photos():
    from imgtriage.train.auto_recipe import Costs, plan_recipe
    from imgtriage.train.config import TrainConfig

    cfg, counts, cheap = TrainConfig(model="crop_cnn", img_size=32), {"a": 40, "b": 40}, \
        Costs(1e-4, 5e-4)
    for chans, eight_bit, scaling in ((1, True, "percentile"), (3, False, "percentile"),
                                      (5, False, "percentile"), (3, True, "dtype")):
        got, why = plan_recipe(cfg, counts, 10, pretrained=False, rgb_photos=chans == 3,
                               costs=cheap, in_chans=chans, eight_bit=eight_bit)
        assert got.scaling == scaling and f"--scaling {scaling}" in why
        assert got.augment == "light" and got.modality == "generic"  # flips, no colour op
        assert (got.label_smoothing, got.ema_decay, got.lr) == (0.1, 0.995, 2e-3)
        assert got.schedule == "onecycle"


def test_scratch_recipe_keeps_every_option_given():
    from imgtriage.train.auto_recipe import Costs, plan_recipe
    from imgtriage.train.config import TrainConfig

    given = TrainConfig(model="deep_cnn", img_size=96, scaling="dtype", augment="flip",
                        label_smoothing=0.05, ema_decay=0.9, lr=1e-2, epochs=7,
                        model_kwargs={"widths": [8, 16, 32, 64]})
    got, _ = plan_recipe(given, {"a": 400, "b": 400}, 100, pretrained=False,
                         rgb_photos=False, costs=Costs(0.01, 0.05), in_chans=1,
                         size_given=True)
    for name in ("img_size", "scaling", "augment", "label_smoothing", "ema_decay", "lr",
                 "epochs", "model_kwargs"):
        assert getattr(got, name) == getattr(given, name), name


def test_options_given_at_their_default_value_are_kept_too():
    """TrainConfig(epochs=10) when 10 is the default is a choice, not "unset"."""
    from imgtriage.train.auto_recipe import Costs, plan_recipe
    from imgtriage.train.config import TrainConfig, field_default

    names = ("epochs", "augment", "label_smoothing", "ema_decay", "lr")
    defaults = {n: field_default(n) for n in names}
    args = {"counts": {"a": 40, "b": 40}, "n_val": 10, "pretrained": False,
            "rgb_photos": False, "costs": Costs(1e-4, 5e-4), "in_chans": 1}
    free, _ = plan_recipe(TrainConfig(model="crop_cnn", img_size=32), **args)
    assert all(getattr(free, n) != v for n, v in defaults.items())  # auto changes each
    given, why = plan_recipe(TrainConfig(model="crop_cnn", img_size=32, **defaults), **args)
    assert {n: getattr(given, n) for n in names} == defaults
    assert f"--epochs {defaults['epochs']} given: kept" in why
    alone, why = plan_recipe(TrainConfig(model="crop_cnn", img_size=32, augment="none"),
                             **args)
    assert alone.augment == "none" and "--augment none given: kept" in why
    # what auto changed is not recorded as given
    assert free.given == ("img_size", "model") and given.given == tuple(sorted(
        ("img_size", "model", *names)))


def test_short_budget_shrinks_deep_cnn_side_then_widths():
    from imgtriage.train.auto_recipe import (
        HALF_WIDTHS,
        SCRATCH_MIN_EPOCHS,
        Costs,
        plan_recipe,
        plan_scratch,
        scratch_sides,
    )
    from imgtriage.train.config import TrainConfig

    assert scratch_sides("deep_cnn", 96) == [96, 80, 64, 48]
    assert scratch_sides("crop_cnn", 28) == [28]
    # MSTAR-like: 2,472 train chips; half widths ~3.5x cheaper (timed on 2 cores)
    costs = {None: Costs(1 / 60, 1 / 15, 96), HALF_WIDTHS: Costs(1 / 200, 1 / 52, 96)}
    cfg = TrainConfig(model="deep_cnn", img_size=96)
    plans = []
    for minutes in (5, 15, 60, 600):
        got, why = plan_recipe(replace(cfg, time_budget=minutes), {"a": 1236, "b": 1236},
                               275, pretrained=False, rgb_photos=False, costs=costs,
                               in_chans=1)
        widths = tuple(got.model_kwargs.get("widths", ())) or None
        plans.append((got.img_size, widths, got.epochs))
        assert got.epochs >= 1 and f"estimate at {got.img_size} px" in why
    assert plans[-1] == (96, None, 40)  # all the time in the world: the model as chosen
    assert plans[1][1] == HALF_WIDTHS and plans[1][2] >= SCRATCH_MIN_EPOCHS
    assert plans[0][0] == 48 and plans[0][2] < SCRATCH_MIN_EPOCHS  # the cheapest
    c = Costs(0.001, 0.004, 64)
    assert plan_scratch(100, 10, [(64, None, c)], 1).epochs == 1  # never 0


def test_probe_reads_channels_and_bit_depth(tmp_path):
    from imgtriage.data.discovery import discover

    for name, arr in (("u8", np.zeros((20, 24), np.uint8)),
                      ("u16", np.full((20, 24), 3000, np.uint16))):
        for c in "ab":
            (tmp_path / name / c).mkdir(parents=True)
            Image.fromarray(arr).save(tmp_path / name / c / "x.png")
        probe = probe_images(discover(tmp_path / name).samples)
        assert (probe.in_chans, probe.median_hw) == (1, (20, 24))
        assert probe.eight_bit == (name == "u8")


def test_the_probe_counts_the_bands_of_a_4_band_tiff_and_drops_only_real_alpha(tmp_path):
    import tifffile

    from imgtriage.data import Sample

    bands = np.zeros((6, 6, 4), np.uint16)
    tifffile.imwrite(tmp_path / "nir.tif", bands, photometric="rgb",
                     extrasamples=["unspecified"])
    tifffile.imwrite(tmp_path / "rgba.tif", bands, photometric="rgb",
                     extrasamples=["unassalpha"])
    assert probe_images([Sample(str(tmp_path / "nir.tif"), "a")]).in_chans == 4
    assert probe_images([Sample(str(tmp_path / "rgba.tif"), "a")]).in_chans == 3
