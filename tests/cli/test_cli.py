"""The CLI end to end: train, inspect, predict, models, demo — as a user runs them."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from imgtriage.cli.main import app

runner = CliRunner()


def test_help_explains_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("train", "predict", "inspect", "demo", "models"):
        assert cmd in res.output
    res = runner.invoke(app, ["train", "--help"])
    assert "--epochs" in res.output and "--val-frac" in res.output


def test_train_inspect_predict(digits_folder, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(digits_folder), "--out", str(run), "--img-size",
                              "32", "--epochs", "2", "--quiet", "--threads", "1", "--model",
                              "crop_cnn"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1].startswith("answers ")  # the rule, even with --quiet
    assert (run / "bundle" / "manifest.json").is_file()
    for f in ("config.json", "splits.csv", "metrics.jsonl", "defects.json"):
        assert (run / f).is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    res = runner.invoke(app, ["inspect", str(run / "bundle")])
    assert res.exit_code == 0 and "crop_cnn" in res.output and "verified" in res.output
    onnx = json.loads((run / "bundle" / "manifest.json").read_text())["onnx"]
    precision = onnx["precision"]  # int8 where its held-out check accepted it, else fp32
    assert precision == ("int8" if onnx["int8"].get("accepted") else "fp32")
    assert f"predicts with ONNX Runtime {precision}" in res.output  # no export step needed
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((digits_folder / "d7").glob("*.png"))[:4]):
        (inbox / ("sub" if i % 2 else "") / p.name).write_bytes(p.read_bytes())
    (inbox / "zero.png").write_bytes(b"")
    out = tmp_path / "r.json"
    gone = str(tmp_path / "gone.png")
    res = runner.invoke(app, ["predict", str(run / "bundle"), str(inbox), gone,
                              "--output", str(out), "--include-probs", "--topk", "3",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"predict: backend onnx, precision {precision}")
    assert f"| backend onnx, precision {precision}" in res.output.splitlines()[-1]
    report = json.loads(out.read_text())
    paths = [r["path"] for r in report["results"]] + [d["path"] for d in report["defects"]]
    assert len(paths) == len(set(paths)) == 6 == report["meta"]["num_files"]
    assert (report["meta"]["backend"], report["meta"]["precision"]) == ("onnx", precision)
    issues = {d["path"].rsplit("/", 1)[-1]: d["issue"] for d in report["defects"]}
    assert issues == {"zero.png": "empty_file", "gone.png": "not_found"}
    r0 = report["results"][0]
    assert len(r0["topk"]) == 3 and abs(sum(r0["probs"].values()) - 1) < 1e-4


def test_errors_are_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imgtriage", "predict", str(tmp_path / "nob"),
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "imgtriage", "train", str(tmp_path),
                           "--model", "resnt18"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_a_path_the_file_system_refuses_is_one_clear_line_too(tmp_path):
    (tmp_path / "taken").write_text("a file where the run folder should go")
    proc = subprocess.run([sys.executable, "-m", "imgtriage", "train", str(tmp_path),
                           "--out", str(tmp_path / "taken")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: File exists: ") and "--out" in proc.stderr


def test_unknown_model_suggests_names():
    from imgtriage.errors import ModelError
    from imgtriage.models import create_model

    with pytest.raises(ModelError, match="Did you mean resnet18"):
        create_model("resnt18", 3)


def test_models_lists_registry():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "crop_cnn" in res.output and "resnet50" in res.output


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--dataset", "digits",
                              "--epochs", "4", "--per-class", "150", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    inbox = tmp_path / "demo" / "data" / "inbox"
    on_disk = {str(p) for p in inbox.rglob("*") if p.is_file()}
    listed = [r["path"] for r in report["results"]] + [d["path"] for d in report["defects"]]
    assert sorted(listed) == sorted(on_disk)
    assert {d["path"].rsplit("/", 1)[-1] for d in report["defects"]} == {
        "empty.png", "truncated.png", "notes.png", "readme.txt", "photo.jpg"}
    assert all(d["message"] for d in report["defects"])
    summary = json.loads((tmp_path / "demo" / "demo-summary.json").read_text())
    assert summary["accuracy_on_inbox"] > 0.5
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in report["results"]}
    assert all(by_name[n]["abstained"] for n in ("noise.png", "constant.png", "blank.png"))
    assert {by_name[n]["reason"] for n in ("constant.png", "blank.png")} == {
        "out_of_distribution"}
    assert summary["refused"]["junk"] == "3 of 3" and summary["unseen_class"] == "9"
    assert sum(summary["refused_by_reason"].values()) == sum(
        r["abstained"] for r in report["results"])
    assert "refused" in res.output and "never-trained class '9'" in res.output


def test_relative_data_path_splits_csv_is_reused_by_calibrate(digits_folder, tmp_path,
                                                               monkeypatch):
    """`train data/ --out runs/x` then `calibrate runs/x/bundle runs/x/splits.csv` (issue 19):
    splits.csv paths must resolve from the manifest's folder, not the starting directory."""
    for cls in ("d0", "d1", "d7"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for p in sorted((digits_folder / cls).glob("*.png"))[:10]:
            (tmp_path / "data" / cls / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["train", "data", "--out", "runs/x", "--img-size", "16",
                              "--epochs", "1", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["calibrate", "runs/x/bundle", "runs/x/splits.csv",
                              "--split", "val"])
    assert res.exit_code == 0, res.output
    assert "temperature" in res.output


@pytest.mark.parametrize(("given", "expected"), [
    ({}, ["-", "10000"]),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "-"]),
    ({"GOMP_SPINCOUNT": "INFINITY"}, ["-", "INFINITY"]),
])
def test_the_command_bounds_openmp_spinning_unless_told(given, expected):
    """Unbounded OpenMP spinning slowed training 2-6x on a shared CPU: the command bounds the
    spin before torch loads, and keeps any wait setting the user made."""
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = ("import sys, os, imgtriage.cli.main; "
            "print(os.environ.get('OMP_WAIT_POLICY', '-'), "
            "os.environ.get('GOMP_SPINCOUNT', '-'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [*expected, "False"]
