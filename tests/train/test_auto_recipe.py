"""The from-scratch recipe `--model auto` (the default) chooses, end to end on tiny real files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


def _shapes(side: int = 20, gain: float = 1.0, seed: int = 0) -> tuple[np.ndarray, int]:
    """A 16-bit frame: a bright square (class 0) or a bright bar (class 1) on noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(2000, 150, (side, side))
    label = seed % 2
    c = int(rng.integers(5, side - 5))
    if label == 0:
        a[c - 3:c + 3, c - 3:c + 3] += 6000
    else:
        a[:, c - 1:c + 2] += 6000
    return (a * gain).clip(0, 65535).astype(np.uint16), label


@pytest.fixture(scope="module")
def deep_grey(tmp_path_factory):
    """30 16-bit grey PNG frames per class, the second class 3x brighter overall: a
    network that keys on absolute intensity could learn brightness instead of shape."""
    root = tmp_path_factory.mktemp("u16")
    for i in range(60):
        a, label = _shapes(seed=i, gain=1.0 + 2.0 * (i % 2))
        (root / f"c{label}").mkdir(exist_ok=True)
        Image.fromarray(a).save(root / f"c{label}" / f"{i:03d}.png")
    return root


def _train(data, out, **kw):
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    cfg = TrainConfig(**{"epochs": 3, "batch_size": 16, "num_threads": 1, "val_frac": 0.25,
                         "quantize": "none", **kw})
    return train(data, out, cfg, quiet=True)


@pytest.fixture(scope="module")
def default_run(deep_grey, tmp_path_factory):
    """A run with no option but the few epochs (and threads) a test can afford."""
    return _train(deep_grey, tmp_path_factory.mktemp("run") / "run", epochs=2)


def test_no_options_picks_robust_scaling_and_augmentation_and_says_why(default_run):
    run, res = default_run.run_dir, default_run
    used = json.loads((run / "config.json").read_text())
    assert (used["scaling"], used["augment"]) == ("percentile", "light")
    assert (used["label_smoothing"], used["ema_decay"]) == (0.1, 0.995)
    assert used["epochs"] == 2  # given: kept
    why = json.loads((run / "run.json").read_text())["model_choice"]
    assert "more than 8 bits" in why and "--scaling percentile" in why
    assert "augment light" in why and "--epochs 2 given: kept" in why
    manifest = json.loads((res.bundle_path / "manifest.json").read_text())
    assert manifest["preprocess"]["scaling"] == "percentile"


def test_the_run_says_the_time_it_planned_against_the_time_it_took(default_run):
    said = json.loads((default_run.run_dir / "run.json").read_text())["time"]
    planned, fixed = said["planned"], said["planned"]["fixed"]
    assert planned["epochs"] == said["epochs_run"] == 2  # --epochs 2 given: planned as given
    assert set(fixed) == {"start", "probe", "decode", "after_training", "onnx", "total"}
    assert fixed["probe"] > 0 and fixed["decode"] >= 0  # measured on this machine and data
    # (reading 45 tiny PNGs can round to 0.00 s)
    assert fixed["total"] == pytest.approx(sum(v for k, v in fixed.items() if k != "total"),
                                           abs=0.3)
    assert planned["total_s"] == pytest.approx(
        fixed["total"] + planned["passes_s"] + 2 * planned["epoch_s"], abs=0.2)
    assert said["actual_s"] == pytest.approx(said["actual_epochs_s"] + said["actual_rest_s"],
                                             abs=0.2)
    assert said["budget_s"] == 900.0 and said["line"].startswith(
        f"time: planned ~{planned['total_s']:.0f}s (2 epochs x")
    assert f"took {said['actual_s']:.0f}s (2 epochs" in said["line"]


def test_options_given_are_kept(deep_grey, tmp_path):
    _train(deep_grey, tmp_path / "run", scaling="dtype", augment="none", ema_decay=0.9,
           model="crop_cnn", img_size=16, model_kwargs={"widths": [8, 16]})
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (used["scaling"], used["augment"], used["ema_decay"]) == ("dtype", "none", 0.9)
    assert used["label_smoothing"] == 0.0 and used["lr"] == 1e-3  # a named model: no recipe


def test_predictions_do_not_change_with_a_global_brightness_change(default_run):
    from imgtriage.data.preprocess import PreprocessSpec, to_input
    from imgtriage.predict import Predictor

    p = Predictor.load(default_run.bundle_path)
    frames = [_shapes(seed=100 + i)[0] for i in range(8)]
    for gain in (2, 0.5):
        brighter = [(f.astype(np.float64) * gain).astype(np.uint16) for f in frames]
        a = p.predict_arrays(frames, include_probs=True)
        b = p.predict_arrays(brighter, include_probs=True)
        for ra, rb in zip(a, b, strict=True):
            assert (ra["class"], ra["abstained"]) == (rb["class"], rb["abstained"])
            np.testing.assert_allclose(list(ra["probs"].values()), list(rb["probs"].values()),
                                       atol=2e-3)
    # the property has teeth: with dtype scaling the model would see different inputs
    dtype = PreprocessSpec.default_for(1, (20, 20), scaling="dtype")
    assert not np.allclose(to_input(frames[0], dtype), to_input(frames[0] * 2, dtype))
