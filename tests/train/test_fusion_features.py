"""The --feature-* options of fusion runs, and extra manifest columns end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgtriage.cli.main import app
from imgtriage.data.features import DEFAULT_HEADER_CARDS
from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor
from imgtriage.train.config import TrainConfig
from imgtriage.train.fusion import feature_spec, manifest_extras
from imgtriage.train.run import train

from .conftest import assert_default_rule


def test_default_cards_keep_their_aliases_and_kinds():
    spec = feature_spec(TrainConfig(model="fusion"), in_chans=1)
    assert spec.header_cards == DEFAULT_HEADER_CARDS
    custom = feature_spec(TrainConfig(model="fusion", feature_cards="IMAGETYP, GAIN, "
                                      "OBJECT:category", feature_stats="moments,entropy"), 3)
    assert [(f.name, f.kind) for f in custom.header_cards] == [
        ("IMAGETYP", "category"), ("GAIN", "number"), ("OBJECT", "category")]
    assert custom.header_cards[0].keys == ("IMAGETYP", "OBSTYPE", "FRAMETYP")
    assert custom.stats == ("moments", "entropy") and custom.channels == 3


def test_bad_kind_and_columns_without_manifest_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="--feature-cards"):
        feature_spec(TrainConfig(model="fusion", feature_cards="EXPTIME:float"), 1)
    spec = feature_spec(TrainConfig(model="fusion", feature_columns="airmass"), 1)
    with pytest.raises(ConfigError, match="manifest"):
        manifest_extras(tmp_path, spec)


def _write(root: Path, n: int, seed: int) -> Path:
    """PNG noise; the label is only in the manifest's ``program`` column."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ("survey", "transient")[i % 2]
        path = root / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
        rows.append({"path": path.name, "label": label, "program": label[:3].upper()})
    manifest = root / "frames.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "program"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def test_extra_manifest_column_is_learned_and_used_at_prediction(tmp_path):
    (tmp_path / "tr").mkdir()
    (tmp_path / "te").mkdir()
    manifest = _write(tmp_path / "tr", 60, 0)
    test_manifest = _write(tmp_path / "te", 20, 1)
    cfg = TrainConfig(model="fusion:crop_cnn", feature_cards="none", feature_stats="none",
                      feature_columns="program:category", epochs=10, batch_size=16, lr=1e-2,
                      img_size=16, num_threads=1, select_metric="val_loss",
                      model_kwargs={"backbone_kwargs": {"widths": [8]}, "feature_hidden": 16})
    res = train(manifest, tmp_path / "run", cfg, quiet=True)
    assert_default_rule(res.bundle_path)  # the image + feature graph outputs features too
    p = Predictor.load(res.bundle_path)
    assert "program=SUR" in p.features.feature_names_
    files = sorted(str(f) for f in (tmp_path / "te").glob("*.png"))
    truth = {str(tmp_path / "te" / r["path"]): r["label"]
             for r in csv.DictReader(test_manifest.open())}
    untold = p.predict_paths(files)["results"]  # no manifest: imputed and flagged
    assert len(untold) == 20 and all("features_imputed" in r["flags"] for r in untold)
    assert p.use_feature_manifest(test_manifest) == 20
    told = p.predict_paths(files)["results"]
    assert not any(r.get("flags") for r in told)
    # the model's answer, also where the default rule abstains (best_class)
    assert np.mean([truth[r["path"]] == r.get("best_class", r["class"]) for r in told]) == 1.0

    out = tmp_path / "cli.json"
    cli = CliRunner().invoke(app, ["predict", str(res.bundle_path), *files, "--output",
                                   str(out), "--feature-manifest", str(test_manifest),
                                   "--no-progress"])
    assert cli.exit_code == 0, cli.output
    rows = json.loads(out.read_text())["results"]
    assert [r["class"] for r in rows] == [r["class"] for r in told]
