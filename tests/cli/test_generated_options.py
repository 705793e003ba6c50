"""Commands whose options are generated from their config dataclass: every field is an option,
the defaults are the library's, and the values given reach the config unchanged."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from imgtriage.cli._options import cli_default, option_flag, option_value
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


def _all_commands() -> list[tuple[str, Any]]:
    """Every registered command, groups walked (``gallery add``, ...)."""
    out: list[tuple[str, Any]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):  # a group
            for name, sub in sorted(cmd.commands.items()):
                walk(sub, [*path, name])
        else:
            out.append((" ".join(path), cmd))

    walk(get_command(app), [])
    return out


COMMANDS = _all_commands()


def _configs(cmd: Any) -> tuple[type, ...]:
    return getattr(inspect.unwrap(cmd.callback), "configs", ())


def _options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if p.param_type_name == "option" and p.name != "help"]


def test_the_walk_finds_every_command():
    names = {name for name, _ in COMMANDS}
    assert {"train", "train-fewshot", "serve", "predict", "report", "inspect", "demo",
            "evaluate", "calibrate", "export", "cascade", "import", "models", "weights",
            "gallery add", "gallery remove", "gallery list", "gallery rule", "gallery create",
            "gallery fit-threshold"} <= names


@pytest.mark.parametrize(("name", "cmd"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_is_a_config_field_with_its_default(name, cmd):
    """No option is declared by hand: each is a field of one of the command's configs, with
    that field's help and flag, and the value it gives when left out is the field's default;
    every field with help text is an option (or the command's argument of the same name)."""
    configs = _configs(cmd)
    backing = {f.name: (cls, f) for cls in configs for f in fields(cls) if "help" in f.metadata}
    params = {p.name: p for p in cmd.params}
    for p in _options(cmd):
        assert p.name in backing, (f"`imgtriage {name}` declares {p.opts} by hand: make it a "
                                   "field of a config dataclass (cli/_options.py)")
        cls, f = backing[p.name]
        assert p.help == f.metadata["help"]
        assert option_flag(f).split("/")[0] in p.opts
        if p.required:
            assert f.default is MISSING and f.default_factory is MISSING
            continue
        assert p.default == cli_default(cls, f)
        want = f.default if f.default is not MISSING else f.default_factory()
        assert option_value(cls, f, p.default) == want, (
            f"`imgtriage {name} --help` shows {p.default!r} for {p.opts}, which reads as "
            f"{option_value(cls, f, p.default)!r}, not {cls.__name__}.{f.name}'s {want!r}")
    for field_name, (cls, _) in backing.items():
        assert field_name in params, f"{cls.__name__}.{field_name} is not on `{name}`"


@pytest.mark.parametrize(("name", "cmd"), COMMANDS, ids=[n for n, _ in COMMANDS])
def test_help_shows_the_config_defaults(name, cmd):
    res = runner.invoke(app, [*name.split(), "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    ctx = cmd.context_class(cmd)
    for p in _options(cmd):
        if p.default in (None, False, "", ...):
            continue
        want = str(p.default)
        if p.is_flag and p.secondary_opts:  # --on/--off shows the side that is the default
            want = (p.opts if p.default else p.secondary_opts)[0].lstrip("-")
        record = p.get_help_record(ctx)
        assert record is not None and f"[default: {want}]" in record[1].replace("\n", " ")


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
    assert seen["args"][2] == FewShotConfig()
    assert seen["kwargs"] == {"quiet": True, "resume": False}
    res = runner.invoke(app, ["train-fewshot", str(tmp_path), "--widths", "8,16",
                              "--threads", "1", "--loss", "triplet", "--knn-k", "3",
                              "--patience", "2", "--resume"])
    assert res.exit_code == 0, res.output
    assert seen["args"][2] == FewShotConfig(widths=(8, 16), num_threads=1, loss="triplet",
                                            knn_k=3, patience=2)
    assert seen["kwargs"] == {"quiet": False, "resume": True}


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


def _capture_into(monkeypatch, module: str, name: str, result: Any = None) -> dict:
    import importlib

    seen: dict = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        if result is None:
            raise SystemExit(0)
        return result

    monkeypatch.setattr(importlib.import_module(module), name, capture)
    return seen


def test_train_run_options_and_text_fields_reach_the_call(monkeypatch, tmp_path):
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run_options import TrainRunOptions

    seen = _capture_into(monkeypatch, "imgtriage.train.run", "train")
    res = runner.invoke(app, ["train", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, TrainRunOptions().out, TrainConfig())
    assert seen["kwargs"] == {"quiet": False, "resume": False}
    res = runner.invoke(app, ["train", str(tmp_path), "-o", "r", "--resume", "-q",
                              "--model-kwargs", '{"widths": [8, 16]}', "--pretrained", "none",
                              "--conservative-classes", "flat, dark", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (tmp_path, Path("r"), TrainConfig(
        model_kwargs={"widths": [8, 16]}, pretrained="none",
        conservative_classes=("flat", "dark"), num_threads=1))
    assert seen["kwargs"] == {"quiet": True, "resume": True}
    res = runner.invoke(app, ["train", str(tmp_path), "--model-kwargs", "{widths"])
    assert res.exit_code != 0 and "--model-kwargs" in str(res.exception or res.output)


def test_import_options_reach_the_config(monkeypatch, tmp_path):
    from imgtriage.predict.importing import ImportConfig

    seen = _capture_into(monkeypatch, "imgtriage.predict.importing", "import_model")
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n\nbird\n")
    res = runner.invoke(app, ["import", "m.onnx", "-o", "b", "--classes", str(names),
                              "--mean", "0.5,0.4,0.3", "--std", "0.2, 0.2, 0.2",
                              "--preprocess", "custom"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (Path("m.onnx"), Path("b"), ImportConfig(
        classes=("cat", "dog", "bird"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2),
        preprocess="custom"))
    res = runner.invoke(app, ["import", "m.onnx", "-o", "b", "--classes", "a,b"])
    assert seen["args"][2] == ImportConfig(classes=("a", "b"))
    res = runner.invoke(app, ["import", "m.onnx", "-o", "b", "--classes", "a,b", "--mean", "x"])
    assert res.exit_code != 0 and "--mean" in str(res.exception or res.output)
    res = runner.invoke(app, ["import", "m.onnx", "--classes", "a,b"])
    assert res.exit_code != 0 and "--out" in res.output


def test_gallery_edits_reach_their_calls(monkeypatch, tmp_path):
    mod = "imgtriage.predict.gallery_edit"
    seen = _capture_into(monkeypatch, mod, "enrol_images")
    res = runner.invoke(app, ["gallery", "add", "g", "a.png", "b.png", "-l", "cat"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (Path("g"), "cat", [Path("a.png"), Path("b.png")])
    assert seen["kwargs"] == {"out": None}
    assert runner.invoke(app, ["gallery", "add", "g", "a.png"]).exit_code != 0  # --label
    seen = _capture_into(monkeypatch, mod, "remove_items")
    res = runner.invoke(app, ["gallery", "remove", "g", "x.png", "--label", "cat", "--images",
                              "y.png", "--images", "z.png", "-o", "g2"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (Path("g"), "cat", ["y.png", "z.png", "x.png"])
    assert seen["kwargs"] == {"out": Path("g2")}
    runner.invoke(app, ["gallery", "remove", "g", "-l", "cat"])
    assert seen["args"] == (Path("g"), "cat", None)
    seen = _capture_into(monkeypatch, mod, "describe_gallery")
    res = runner.invoke(app, ["gallery", "list", "g", "--items", "--json"])
    assert res.exit_code == 0 and seen["kwargs"] == {"items": True}
    seen = _capture_into(monkeypatch, mod, "fit_threshold")
    res = runner.invoke(app, ["gallery", "fit-threshold", "g"])
    assert res.exit_code == 0 and seen["args"] == (Path("g"), 0.95)
    runner.invoke(app, ["gallery", "fit-threshold", "g", "--acceptance", "0.8", "-o", "h"])
    assert seen["args"] == (Path("g"), 0.8) and seen["kwargs"] == {"out": Path("h")}


def test_inspect_report_and_demo_options_reach_their_calls(monkeypatch, tmp_path):
    from imgtriage.demo import DemoConfig, run_demo

    seen = _capture_into(monkeypatch, "imgtriage.bundle", "load_bundle")
    runner.invoke(app, ["inspect", "b"])
    assert seen["args"] == (Path("b"),) and seen["kwargs"] == {"verify": True}
    runner.invoke(app, ["inspect", "b", "--no-verify", "--json"])
    assert seen["kwargs"] == {"verify": False}
    seen = _capture_into(monkeypatch, "imgtriage.predict.runner", "report_from_store")
    res = runner.invoke(app, ["report", "s.sqlite", "-o", "r.json", "--defect-log", "d.json"])
    assert res.exit_code == 0, res.output
    assert seen["args"] == (Path("s.sqlite"), Path("r.json"))
    assert seen["kwargs"] == {"defect_log": Path("d.json")}
    assert runner.invoke(app, ["report", "s.sqlite"]).exit_code != 0  # --output is required
    seen = _capture_into(monkeypatch, "imgtriage.demo", "run_demo")
    runner.invoke(app, ["demo"])
    defaults = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    cfg = DemoConfig()
    assert seen["args"] == (cfg.out,) and Path(defaults.pop("out_dir")) == cfg.out
    assert seen["kwargs"] == defaults == {"dataset": cfg.dataset, "per_class": cfg.per_class,
                                          "epochs": cfg.epochs, "quiet": cfg.quiet}
    runner.invoke(app, ["demo", "-o", "d", "--dataset", "digits", "--per-class", "5",
                        "--epochs", "1", "-q"])
    assert seen["args"] == (Path("d"),)
    assert seen["kwargs"] == {"dataset": "digits", "per_class": 5, "epochs": 1, "quiet": True}
