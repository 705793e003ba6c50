"""`imgtriage train` on data with byte copies across its splits, then `imgtriage evaluate`:
validation copies of training images leave validation, run.json and the bundle say how
many, test copies are warned about in both commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.cli.main import app
from imgtriage.data.duplicates import unpack_digests
from shared_helpers import write_digits_folder


def _data_with_copies(root: Path) -> Path:
    src = write_digits_folder(root / "src", per_class=10, classes=(0, 1))
    data = root / "data"
    for c in ("d0", "d1"):
        files = sorted((src / c).glob("*.png"))
        for split, part in (("train", files[:6]), ("val", files[6:8]), ("test", files[8:])):
            (data / split / c).mkdir(parents=True)
            for f in part:
                shutil.copy(f, data / split / c / f.name)
        shutil.copy(files[0], data / "val" / c / "val_copy.png")
        shutil.copy(files[1], data / "test" / c / "test_copy.png")
    return data


def test_train_removes_val_copies_and_evaluate_flags_test_copies(tmp_path):
    data, run = _data_with_copies(tmp_path), tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(data), "--out", str(run), "--model", "crop_cnn",
                              "--img-size", "32", "--epochs", "1", "--threads", "1",
                              "--quantize", "none"])
    assert res.exit_code == 0, res.output
    assert "2 validation copies of training images removed from validation" in res.output
    assert "warning: 2 test images are byte copies of training images" in res.output
    assert "12 train / 4 val" in res.output
    dups = json.loads((run / "run.json").read_text())["duplicates"]
    assert (dups["val_copies_removed"], dups["test_copies_of_train"]) == (2, 2)
    assert sorted(Path(p).name for p in dups["test_copies"]) == ["test_copy.png"] * 2
    splits = (run / "splits.csv").read_text()
    assert "val_copy.png" not in splits and "test_copy.png" in splits
    bundle = load_bundle(run / "bundle")
    assert bundle.info.training["duplicates"]["val_copies_removed"] == 2
    assert len(unpack_digests(bundle.read_bytes(bundle.info.training["train_digests"]))) == 12
    res = runner.invoke(app, ["evaluate", str(run / "bundle"), str(data / "test"),
                              "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert "2 of the 6 images are byte copies of images this bundle was trained on" in res.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert any("test_copy.png" in w for w in report["extra"]["warnings"])
