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
