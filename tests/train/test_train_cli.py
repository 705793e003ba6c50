"""`imgtriage train`: every TrainConfig field is an option with help, values reach the config."""

from __future__ import annotations

import json
from dataclasses import fields

from typer.testing import CliRunner

from imgtriage.cli.main import app
from imgtriage.train.config import TrainConfig, flag

runner = CliRunner()


def test_every_config_field_is_an_option_with_help():
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for f in fields(TrainConfig):
        if f.name == "given":  # which options were typed: not an option itself
            continue
        assert flag(f.name) in res.output, f.name
        assert f.metadata["help"]
    for extra in ("--resume", "--out", "--quiet"):
        assert extra in res.output


def test_cli_values_reach_the_resolved_config(imbalanced_folder, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train", str(imbalanced_folder), "--out", str(run), "--img-size", "16", "--epochs", "1",
        "--batch-size", "8", "--threads", "1", "--quiet", "--model-kwargs",
        '{"widths": [8, 16, 32]}', "--conservative-classes", "d1, d2", "--augment", "light",
        "--modality", "document", "--balanced-sampling", "--max-repeat", "2",
        "--loss-strategy", "focal", "--focal-gamma", "1.5", "--optimizer", "sgd",
        "--schedule", "cosine", "--warmup-epochs", "0.5", "--ema-decay", "0.9"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["conservative_classes"] == ["d1", "d2"]
    assert cfg["model_kwargs"] == {"widths": [8, 16, 32]} and cfg["num_threads"] == 1
    assert cfg["balanced_sampling"] is True and cfg["max_repeat"] == 2
    assert (cfg["optimizer"], cfg["schedule"], cfg["focal_gamma"]) == ("sgd", "cosine", 1.5)
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["tta"] == []  # documents: no flip keeps the label


def test_options_typed_at_their_default_value_are_kept_by_auto(tmp_path, monkeypatch):
    """`--epochs 10` (the default value) and `--augment none` are the user's choice: the
    config records them as given and the auto recipe keeps them; `--scaling auto` given
    still leaves the scaling to auto; options not typed are auto's to choose."""
    from types import SimpleNamespace

    from imgtriage.train import run as run_mod
    from imgtriage.train.auto_recipe import Costs, plan_recipe
    from imgtriage.train.config import field_default

    seen = []
    monkeypatch.setattr(run_mod, "train", lambda data, out, cfg, **kw: seen.append(cfg) or
                        SimpleNamespace(bundle_path=out / "bundle", rule=""))
    base = ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--model", "crop_cnn",
            "--img-size", "32"]
    typed = ["--epochs", str(field_default("epochs")), "--augment", "none",
             "--scaling", "auto"]
    for args in (base, base + typed):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    free, given = seen
    assert free.given == ("img_size", "model")
    assert given.given == ("augment", "epochs", "img_size", "model", "scaling")
    plans = [plan_recipe(c, {"a": 40, "b": 40}, 10, pretrained=False, rgb_photos=False,
                         costs=Costs(1e-4, 5e-4), in_chans=1, size_given=True)
             for c in (free, given)]
    (auto_cfg, _), (kept, why) = plans
    assert auto_cfg.epochs != field_default("epochs") and auto_cfg.augment == "light"
    assert (kept.epochs, kept.augment) == (field_default("epochs"), "none")
    assert kept.scaling == auto_cfg.scaling == "percentile"
    assert f"--epochs {field_default('epochs')} given: kept" in why


def test_bad_values_fail_with_the_flag_named(imbalanced_folder, tmp_path):
    res = runner.invoke(app, ["train", str(imbalanced_folder), "--out", str(tmp_path),
                              "--schedule", "step"])
    assert res.exit_code != 0 and "--schedule" in str(res.exception)
    res = runner.invoke(app, ["train", str(imbalanced_folder), "--out", str(tmp_path),
                              "--model-kwargs", "{bad"])
    assert res.exit_code != 0 and "--model-kwargs" in str(res.exception)


def test_the_decode_budget_is_a_training_option_kept_in_the_bundle_spec():
    import pytest

    from imgtriage.errors import ConfigError
    from imgtriage.train.run import resolve_spec

    spec = resolve_spec(TrainConfig(model="crop_cnn", max_decoded_bytes=256 * 2**20), 1)
    assert spec.read.max_decoded_bytes == 256 * 2**20
    assert spec.to_dict()["read"]["max_decoded_bytes"] == 256 * 2**20
    with pytest.raises(ConfigError, match="--max-decoded-bytes"):
        resolve_spec(TrainConfig(model="crop_cnn", max_decoded_bytes=0), 1)
