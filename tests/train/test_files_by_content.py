"""train, evaluate and predict decide what is an image the same way: by the bytes. A PNG
without an extension is trained on, scored and classified; a text file (with or without an
extension) is reported with the same issue and message by all three, never dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from imgtriage.cli.main import app
from shared_helpers import write_digits_folder


def _folder(root: Path) -> Path:
    data = write_digits_folder(root / "data", per_class=8, classes=(0, 1))
    for c in ("d0", "d1"):
        first = sorted((data / c).glob("*.png"))[0]
        shutil.move(first, data / c / f"scan_{c}")  # an image without an extension
    (data / "d0" / "README").write_text("scanner settings: 300 dpi\n")
    (data / "d1" / "notes.txt").write_text("two of these are blurry\n")
    return data


def test_train_evaluate_predict_agree_on_files_without_extension(tmp_path):
    data, run = _folder(tmp_path), tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--model", "crop_cnn",
                              "--img-size", "32", "--epochs", "1", "--threads", "1",
                              "--quantize", "none"])
    assert res.exit_code == 0, res.output
    assert "not images: 2 unreadable (unsupported_format x2)" in res.output
    used = (run / "splits.csv").read_text()
    assert "scan_d0" in used and "scan_d1" in used and "README" not in used
    train_log = {Path(d["path"]).name: d for d in json.loads((run / "defects.json").read_text())}
    assert {train_log[n]["issue"] for n in ("README", "notes.txt")} == {"unsupported_format"}

    res = runner.invoke(app, ["evaluate", str(run / "bundle"), str(data), "--out",
                              str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert "2 files not scored (unsupported_format x2" in res.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["meta"]["n_samples"] == 16  # both extensionless PNGs scored
    eval_log = {Path(d["path"]).name: d for d in report["extra"]["defects"]}

    out, log = tmp_path / "pred.json", tmp_path / "pred_defects.json"
    res = runner.invoke(app, ["predict", str(run / "bundle"), str(data), "--output", str(out),
                              "--defect-log", str(log), "--no-progress"])
    assert res.exit_code == 0, res.output
    predicted = {Path(r["path"]).name for r in json.loads(out.read_text())["results"]}
    assert {"scan_d0", "scan_d1"} <= predicted
    pred_log = {Path(d["path"]).name: d for d in json.loads(log.read_text())}
    for name in ("README", "notes.txt"):
        assert train_log[name] == eval_log[name] == pred_log[name], name
