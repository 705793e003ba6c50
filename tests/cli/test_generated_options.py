"""Commands whose options are generated from their config dataclass: every field is an option,
the defaults are the library's, and the values given reach the config unchanged."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from imgtriage.cli.main import app
from imgtriage.errors import ConfigError
from imgtriage.predict import PredictOptions
from imgtriage.predict.assess_config import CalibrateConfig, EvaluateConfig
from imgtriage.predict.cascade import CascadeConfig
from imgtriage.predict.export_config import ExportConfig
from imgtriage.predict.gallery_edit_config import GalleryCreateConfig, GalleryRuleChange
from imgtriage.predict.run_config import PredictRunConfig
from imgtriage.serve.config import ServeConfig
from imgtriage.train.fewshot_config import FewShotConfig

runner = CliRunner()


def _command(name: str):
    cmd = get_command(app)
    for part in name.split():  # "gallery rule": a command of a group
        cmd = cmd.commands[part]
    return cmd


@pytest.mark.parametrize(("command", "cls", "own"), [
    ("serve", ServeConfig, {"bundle"}), ("train-fewshot", FewShotConfig, set()),
    ("cascade", CascadeConfig, {"features"}), ("predict", PredictOptions, {"thresholds"}),
    ("export", ExportConfig, set()), ("evaluate", EvaluateConfig, set()),
    ("calibrate", CalibrateConfig, set()), ("predict", PredictRunConfig, set()),
    ("gallery rule", GalleryRuleChange, set()),
    ("gallery create", GalleryCreateConfig, set())])
def test_every_field_is_an_option_with_its_help(command, cls, own):
    params = {p.name: p for p in _command(command).params}
    for f in fields(cls):
        if f.name in own:
            continue
        assert f.name in params, f"{cls.__name__}.{f.name} has no option on `{command}`"
        assert params[f.name].help == f.metadata["help"]


def _captured(monkeypatch, module: str, name: str) -> dict:
    import importlib

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

        class R:
            bundle_path, precision, seconds = "x", "fp32", 0.0
        return R()

    monkeypatch.setattr(importlib.import_module(module), name, capture)
    return seen


def test_serve_defaults_and_values_reach_the_config(monkeypatch, tmp_path):
    seen = _captured(monkeypatch, "imgtriage.serve.app", "serve")
    res = runner.invoke(app, ["serve", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["args"][0] == ServeConfig(bundle=str(tmp_path))
    res = runner.invoke(app, ["serve", str(tmp_path), "--port", "9001", "--threads", "2",
                              "--allowed-formats", "png, jpeg", "--cors-origin",
                              "https://a.example", "--cors-origin", "https://b.example",
                              "--request-timeout", "7", "--no-access-log",
                              "--legacy-classify-route"])
    assert res.exit_code == 0, res.output
    assert seen["args"][0] == ServeConfig(
        bundle=str(tmp_path), port=9001, threads=2, allowed_formats=("png", "jpeg"),
        cors_origins=("https://a.example", "https://b.example"), request_timeout_s=7.0,
        access_log=False, legacy_classify=True)


def test_serve_refuses_a_bad_value_naming_the_flag(tmp_path):
    res = runner.invoke(app, ["serve", str(tmp_path), "--max-wait-ms", "5000"])
    assert res.exit_code != 0 and "--max-wait-ms" in str(res.exception or res.output)


def test_train_fewshot_defaults_and_values_reach_the_config(monkeypatch, tmp_path):
    seen = _captured(monkeypatch, "imgtriage.train.fewshot", "train_fewshot")
    res = runner.invoke(app, ["train-fewshot", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    assert seen["args"][2] == FewShotConfig() and seen["kwargs"] == {"quiet": True}
    res = runner.invoke(app, ["train-fewshot", str(tmp_path), "--widths", "8,16",
                              "--threads", "1", "--loss", "triplet", "--knn-k", "3"])
    assert res.exit_code == 0, res.output
    assert seen["args"][2] == FewShotConfig(widths=(8, 16), num_threads=1, loss="triplet",
                                            knn_k=3)


def test_cascade_values_reach_the_config(monkeypatch, tmp_path):
    import imgtriage.predict.cascade as cascade

    seen = {}

    def capture(stage2, data, out, cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(cascade, "build_cascade", capture)
    res = runner.invoke(app, ["cascade", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "c"),
                              "--first-stage", "gbt", "--route-share", "0.4",
                              "--always-second-stage", "sar,ir", "--gbt-depth", "2"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"] == CascadeConfig(first_stage="gbt", route_share=0.4,
                                        always_second_stage=("sar", "ir"), gbt_depth=2)


def test_export_defaults_and_values_reach_the_config(monkeypatch, tmp_path):
    seen = _captured(monkeypatch, "imgtriage.predict.export", "export_onnx")
    res = runner.invoke(app, ["export", str(tmp_path), "--onnx"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, ExportConfig())
    res = runner.invoke(app, ["export", str(tmp_path), "--onnx", "--quantize", "dynamic",
                              "--calib", str(tmp_path / "c"), "--check", str(tmp_path / "k"),
                              "--calib-images", "8", "--check-images", "9", "--opset", "13",
                              "--out", str(tmp_path / "o.zip")])
    assert res.exit_code == 0, res.output
    assert seen["args"][1] == ExportConfig(quantize="dynamic", calib=tmp_path / "c",
                                           check=tmp_path / "k", calib_images=8,
                                           check_images=9, opset=13, out=tmp_path / "o.zip")


def test_export_refuses_a_bad_value_naming_the_flag(tmp_path):
    res = runner.invoke(app, ["export", str(tmp_path), "--onnx", "--check-images", "0"])
    assert res.exit_code != 0 and "--check-images" in str(res.exception or res.output)


def test_evaluate_defaults_and_values_reach_the_config(monkeypatch, tmp_path):
    import imgtriage.predict.assess as assess

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise SystemExit(0)

    monkeypatch.setattr(assess, "evaluate_bundle", capture)
    monkeypatch.setattr(assess, "drift_against", capture)
    res = runner.invoke(app, ["evaluate", str(tmp_path), str(tmp_path), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, tmp_path, tmp_path / "e", EvaluateConfig())
    res = runner.invoke(app, ["evaluate", str(tmp_path), str(tmp_path), "--split", "test",
                              "--tta", "--profile", "strict", "--batch-size", "8",
                              "--ood", str(tmp_path / "ood")])
    assert res.exit_code == 0, res.output
    assert seen["args"][3] == EvaluateConfig(split="test", tta=True, profile="strict",
                                             batch_size=8, ood=tmp_path / "ood")
    res = runner.invoke(app, ["evaluate", str(tmp_path), str(tmp_path), "--reference",
                              str(tmp_path / "ref"), "--drift-alpha", "0.05"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, [tmp_path], tmp_path / "ref")
    assert seen["kwargs"] == {"alpha": 0.05, "batch_size": 64}


def test_evaluate_refuses_a_bad_value_naming_the_flag(tmp_path):
    res = runner.invoke(app, ["evaluate", str(tmp_path), str(tmp_path), "--drift-alpha", "2"])
    assert res.exit_code != 0 and "--drift-alpha" in str(res.exception or res.output)


def test_calibrate_defaults_and_values_reach_the_config(monkeypatch, tmp_path):
    import imgtriage.predict.assess as assess

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise SystemExit(0)

    monkeypatch.setattr(assess, "calibrate_bundle", capture)
    res = runner.invoke(app, ["calibrate", str(tmp_path), str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, tmp_path, CalibrateConfig())
    assert seen["kwargs"] == {"out": None}
    res = runner.invoke(app, ["calibrate", str(tmp_path), str(tmp_path), "--split", "val",
                              "--threshold-strategy", "target_recall", "--target", "0.9",
                              "--delta", "0.05", "--abstain", "--conformal-method", "aps",
                              "--alpha", "0.2", "--mondrian", "--allow-empty", "--set-abstain",
                              "--positive-class", "unsafe", "--no-ood", "--profile", "recall",
                              "--make-default", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert seen["args"][2] == CalibrateConfig(
        split="val", threshold_strategy="target_recall", target=0.9, delta=0.05, abstain=True,
        conformal_method="aps", alpha=0.2, mondrian=True, allow_empty=True, set_abstain=True,
        positive_class="unsafe", ood=False, profile="recall", make_default=True)
    assert seen["kwargs"] == {"out": tmp_path / "o"}
    res = runner.invoke(app, ["calibrate", str(tmp_path), str(tmp_path), "--keep-default"])
    assert seen["args"][2] == CalibrateConfig(make_default=False)


def test_calibrate_refuses_a_bad_value_naming_the_flag(tmp_path):
    res = runner.invoke(app, ["calibrate", str(tmp_path), str(tmp_path),
                              "--conformal-method", "xyz"])
    assert res.exit_code != 0 and "--conformal-method" in str(res.exception or res.output)


def test_calibrate_config_names_the_positive_class():
    cfg = CalibrateConfig(positive_class="unsafe", threshold_strategy="cost", cost_fn=5.0)
    fit = cfg.fit_options(["safe", "unsafe"])
    assert fit["positive_class"] == 1 and fit["cost_fn"] == 5.0
    assert fit["threshold_strategy"] == "cost" and fit["profile"] == "default"
    with pytest.raises(ConfigError, match="--positive-class"):
        cfg.fit_options(["cat", "dog"])


def test_predict_run_settings_reach_the_config(monkeypatch, tmp_path):
    import imgtriage.predict.runner as runner_mod

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise SystemExit(0)

    monkeypatch.setattr(runner_mod, "predict_files", capture)
    res = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path)])
    assert res.exit_code == 0, res.output
    bundle, paths, run, options = seen["args"]
    assert (bundle, paths, run) == (tmp_path, [tmp_path], PredictRunConfig())
    assert PredictOptions(**options) == PredictOptions()
    res = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), "-o", "r.csv",
                              "--store", "s.sqlite", "--new-only", "--batch-size", "4",
                              "--thresholds", "0.5,0.6", "--backend", "torch",
                              "--workers", "2", "--executor", "process", "--no-progress",
                              "--max-pages", "3", "--decode-timeout", "1.5", "--topk", "2"])
    assert res.exit_code == 0, res.output
    assert seen["args"][2] == PredictRunConfig(
        output=Path("r.csv"), store=Path("s.sqlite"), new_only=True, batch_size=4,
        thresholds="0.5,0.6", backend="torch", workers=2, executor="process", progress=False,
        max_pages=3, decode_timeout=1.5)
    assert seen["args"][3]["topk"] == 2


def test_predict_refuses_a_bad_run_setting_naming_the_flag(tmp_path):
    for args, flag in ((["--engine", "spark"], "--engine"), (["--workers", "0"], "--workers")):
        res = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), *args])
        assert res.exit_code != 0 and flag in str(res.exception or res.output)


def test_gallery_rule_values_reach_the_config(monkeypatch, tmp_path):
    import imgtriage.predict.gallery_edit as gallery_edit

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise SystemExit(0)

    monkeypatch.setattr(gallery_edit, "set_rule", capture)
    res = runner.invoke(app, ["gallery", "rule", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, GalleryRuleChange()) and seen["kwargs"] == {"out": None}
    res = runner.invoke(app, ["gallery", "rule", str(tmp_path), "--method", "knn", "--knn-k",
                              "3", "--no-threshold", "-o", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert seen["args"][1] == GalleryRuleChange(method="knn", knn_k=3, clear_threshold=True)
    assert seen["args"][1].changes() == {"method": "knn", "k": 3, "similarity_threshold": None}
    assert seen["kwargs"] == {"out": tmp_path / "g"}
    res = runner.invoke(app, ["gallery", "rule", str(tmp_path), "--method", "mean"])
    assert res.exit_code != 0 and "--method" in str(res.exception or res.output)


def test_gallery_create_values_reach_the_config(monkeypatch, tmp_path):
    import imgtriage.predict.gallery_edit as gallery_edit

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise SystemExit(0)

    monkeypatch.setattr(gallery_edit, "create_gallery", capture)
    res = runner.invoke(app, ["gallery", "create", str(tmp_path), str(tmp_path), "-o", "g"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, tmp_path, Path("g"))
    assert seen["kwargs"] == {"config": GalleryCreateConfig()}
    res = runner.invoke(app, ["gallery", "create", str(tmp_path), str(tmp_path), "-o", "g",
                              "--method", "knn", "--knn-k", "2", "--acceptance", "0.9"])
    assert res.exit_code == 0, res.output
    cfg = seen["kwargs"]["config"]
    assert cfg == GalleryCreateConfig(method="knn", knn_k=2, acceptance=0.9)
    assert (cfg.gallery().method, cfg.gallery().k) == ("knn", 2)
    res = runner.invoke(app, ["gallery", "create", str(tmp_path), str(tmp_path), "-o", "g",
                              "--similarity-threshold", "0.5", "--acceptance", "0.9"])
    assert res.exit_code != 0 and "--acceptance" in str(res.exception or res.output)
