"""Image + feature fusion: a label carried only by a header card is learned by the fusion model
and not by an image-only one; prediction scales features exactly as training did; bundles
round-trip; the CLI trains and predicts it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle, save_bundle
from imgtriage.cli.main import app
from imgtriage.data import discover, samples_by_split
from imgtriage.data.loaders import decode_samples
from imgtriage.data.preprocess import RAW_FEATURES, PreprocessSpec, load_input
from imgtriage.errors import ConfigError, ModelError, PredictionError
from imgtriage.models import create_model, get_entry, list_models
from imgtriage.models.fusion import FusionNet
from imgtriage.predict import Predictor
from imgtriage.train.config import TrainConfig
from imgtriage.train.fusion import fit_features
from imgtriage.train.run import train

runner = CliRunner()
SIDE = 24
SMALL = {"backbone_kwargs": {"widths": [8, 16]}, "feature_hidden": 32}


def write_header_dataset(root: Path, per_class: int, seed: int) -> Path:
    """Two classes of uint16 noise frames drawn from one distribution; only EXPTIME differs
    (short 1-10 s, long 100-200 s), so the header alone decides the label."""
    rng = np.random.default_rng(seed)
    for label, (lo, hi) in (("short", (1.0, 10.0)), ("long", (100.0, 200.0))):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            header = fits.Header()
            header["EXPTIME"] = float(rng.uniform(lo, hi))
            header["IMAGETYP"] = "LIGHT"
            if i % 7 == 3:
                del header["EXPTIME"]  # a missing card: imputed and flagged, never zero
                header["EXPTIME"] = float(rng.uniform(lo, hi)) if label == "long" else 5.0
            pixels = rng.normal(1000, 50, (SIDE, SIDE)).clip(0, 65535).astype(np.uint16)
            fits.PrimaryHDU(pixels, header=header).writeto(folder / f"{label}_{i:03d}.fits")
    return root


def _cfg(model: str, **kw) -> TrainConfig:
    base = dict(model=model, epochs=12, batch_size=16, img_size=SIDE, lr=1e-2, num_threads=1,
                select_metric="val_loss", feature_stats="moments", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _accuracy(report: dict) -> float:
    rows = report["results"]
    return float(np.mean([Path(r["path"]).parent.name == r["class"] for r in rows]))


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fusion")
    return {"train": write_header_dataset(base / "train", 40, 0),
            "test": write_header_dataset(base / "test", 20, 1), "base": base}


@pytest.fixture(scope="module")
def fusion_run(frames) -> Path:
    """Trained through the CLI: `imgtriage train --model fusion:crop_cnn --feature-*`."""
    run = frames["base"] / "run_fusion"
    res = runner.invoke(app, [
        "train", str(frames["train"]), "--out", str(run), "--model", "fusion:crop_cnn",
        "--model-kwargs", json.dumps(SMALL), "--feature-cards", "EXPTIME,IMAGETYP",
        "--feature-stats", "moments", "--epochs", "12", "--batch-size", "16", "--img-size",
        str(SIDE), "--lr", "1e-2", "--threads", "1", "--select-metric", "val_loss", "--quiet"])
    assert res.exit_code == 0, res.output
    return run


# -- the model ---------------------------------------------------------------------------
def test_registry_lists_fusion_and_builds_any_backbone():
    assert "fusion" in list_models("fusion")
    assert get_entry("fusion").family == "fusion"
    for backbone in ("crop_cnn", "timm:resnet18"):
        m = create_model(f"fusion:{backbone}", num_classes=3, in_chans=1, num_features=4,
                         backbone_kwargs={"widths": [8]} if backbone == "crop_cnn" else None)
        assert isinstance(m, FusionNet)
        assert m(torch.zeros(2, 1, 32, 32), torch.zeros(2, 4)).shape == (2, 3)


def test_fusion_without_features_is_an_error():
    m = create_model("fusion:crop_cnn", num_classes=2, in_chans=1, num_features=3)
    with pytest.raises(ModelError, match="features"):
        m(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ModelError, match="num_features"):
        create_model("fusion:crop_cnn", num_classes=2, in_chans=1)


def test_fusion_config_errors_name_the_flag():
    from imgtriage.train.fusion import feature_spec

    with pytest.raises(ConfigError, match="--feature-stats"):
        feature_spec(TrainConfig(model="fusion", feature_stats="moments,colour"), 1)
    with pytest.raises(ConfigError, match="at least one feature"):
        feature_spec(TrainConfig(model="fusion", feature_stats="none", feature_cards="none"), 1)


# -- it learns what only the header says -------------------------------------------------
def test_fusion_learns_a_header_label_an_image_model_cannot(frames, fusion_run, tmp_path):
    fused = Predictor.load(fusion_run / "bundle").predict_paths([frames["test"]])
    image_only = train(frames["train"], tmp_path / "image_only",
                       _cfg("crop_cnn", model_kwargs={"widths": [8, 16]}), quiet=True)
    plain = Predictor.load(image_only.bundle_path).predict_paths([frames["test"]])
    assert len(fused["results"]) == len(plain["results"]) == 40
    assert _accuracy(fused) >= 0.95
    assert _accuracy(plain) <= 0.75  # chance is 0.5: the pixels carry no label


def test_fusion_trains_with_mixup_and_cutmix(frames, tmp_path):
    """Issue 19: MixUp/CutMix were refused for fusion; the features now mix with the labels'
    weight, and the header label is still learnt."""
    res = train(frames["train"], tmp_path / "mixed", _cfg(
        "fusion:crop_cnn", model_kwargs=SMALL, feature_cards="EXPTIME,IMAGETYP",
        mixup_alpha=0.4, cutmix_alpha=1.0, mix_off_epoch=10), quiet=True)
    report = Predictor.load(res.bundle_path).predict_paths([frames["test"]])
    assert _accuracy(report) >= 0.9


def test_streamed_fusion_training_equals_training_from_memory(frames, tmp_path):
    """Issue 19: fusion models can stream (the seed's 448 px frames do not fit in memory):
    the scaler is fitted on the training files' features without keeping pixels, each batch's
    features come from the same decode as its pixels, and the run equals the in-memory one."""
    kw = dict(model_kwargs=SMALL, feature_cards="EXPTIME,IMAGETYP", epochs=4, workers=0)
    runs = {cache: train(frames["train"], tmp_path / cache,
                         _cfg("fusion:crop_cnn", cache=cache, **kw), quiet=True)
            for cache in ("memory", "stream")}
    manifests = {c: load_bundle(r.bundle_path).manifest for c, r in runs.items()}
    assert manifests["stream"]["features"] == manifests["memory"]["features"]
    probs = {c: [r["probs"] for r in sorted(Predictor.load(run.bundle_path, backend="torch")
                                            .predict_paths([frames["test"]], include_probs=True)
                                            ["results"], key=lambda r: r["path"])]
             for c, run in runs.items()}
    diff = max(abs(a[k] - b[k]) for a, b in zip(probs["memory"], probs["stream"], strict=True)
               for k in a)
    assert diff <= 1e-4


def test_fusion_graph_takes_both_inputs_and_answers_like_torch(frames, fusion_run):
    """Issue 19: the fusion model is exported with its two inputs (pixels and scaled
    features), so it predicts on ONNX Runtime by default, as torch does."""
    m = load_bundle(fusion_run / "bundle").manifest
    assert m["onnx"]["inputs"] == ["input", "header_features"]
    assert m["onnx"]["parity_max_abs_dprob"] <= 1e-4
    got = {}
    for backend in ("auto", "torch"):
        p = Predictor.load(fusion_run / "bundle", backend=backend)
        rows = p.predict_paths([frames["test"]], include_probs=True)["results"]
        got[p.backend.name] = {r["path"]: r["probs"] for r in rows}
    assert set(got) == {"onnx", "torch"} and got["onnx"].keys() == got["torch"].keys()
    assert max(abs(got["onnx"][k][c] - got["torch"][k][c]) for k in got["onnx"]
               for c in got["onnx"][k]) <= 1e-4


def test_bundle_records_the_feature_spec_and_scaler(fusion_run):
    m = load_bundle(fusion_run / "bundle").manifest
    assert m["model"]["name"] == "fusion:crop_cnn"
    spec = m["preprocess"]["features"]
    assert [c["name"] for c in spec["header_cards"]] == ["EXPTIME", "IMAGETYP"]
    assert m["features"]["spec"] == spec
    names = m["features"]["feature_names"]
    assert "EXPTIME__missing" in names and "IMAGETYP=LIGHT" in names
    assert m["model"]["kwargs"]["num_features"] == len(names)


# -- prediction scales exactly as training did -------------------------------------------
def _split_samples(run: Path) -> dict[str, list]:
    return samples_by_split(discover(run / "splits.csv"))


def test_prediction_features_equal_training_features(fusion_run):
    bundle = load_bundle(fusion_run / "bundle")
    spec = PreprocessSpec.from_dict(bundle.manifest["preprocess"])
    parts = _split_samples(fusion_run)
    classes = bundle.classes
    tr = decode_samples(parts["train"], classes, spec, workers=1)
    va = decode_samples(parts["val"], classes, spec, workers=1)
    fx, (f_tr, f_va) = fit_features(spec.features, tr, [va])
    saved = bundle.manifest["features"]
    np.testing.assert_array_equal(fx.mean_, saved["mean"])  # fitted on the train split only
    np.testing.assert_array_equal(fx.std_, saved["std"])
    both = fit_features(spec.features, decode_samples(parts["train"] + parts["val"], classes,
                                                      spec, workers=1), [])[0]
    assert not np.allclose(both.mean_, fx.mean_)  # validation rows would have moved it

    p = Predictor.load(bundle)
    for samples, expected in ((parts["train"], f_tr), (parts["val"], f_va)):
        metas = [load_input(s.path, p.spec)[1] for s in samples]
        got = p.feature_matrix(metas, [s.path for s in samples])
        np.testing.assert_array_equal(got, expected)


def test_missing_card_is_imputed_and_flagged(fusion_run):
    p = Predictor.load(fusion_run / "bundle")
    names = p.features.feature_names_
    arr = np.full((SIDE, SIDE), 1000, np.uint16)
    meta = p.decoder.from_array(arr, "no-header").meta
    assert meta[RAW_FEATURES].fields == (None, None)
    row = p.feature_matrix([meta], ["no-header"])[0]
    raw_missing = np.asarray(p.features.transform_arrays(
        np.zeros((1, len(p.features.medians_))), np.zeros((1, len(p.features.medians_)), bool)))
    j = names.index("EXPTIME__missing")
    assert row[j] > raw_missing[0, j]  # the flag is up (standardised), not a silent zero
    k = names.index("EXPTIME")
    expected = (p.features.medians_[k] - p.features.mean_[k]) / p.features.std_[k]
    assert row[k] == pytest.approx(expected)  # the training median, standardised
    (out,) = p.predict_arrays([arr])
    assert out.get("best_class", out["class"]) in p.classes  # answered, or refused as constant


def test_predictor_without_metadata_refuses(fusion_run):
    p = Predictor.load(fusion_run / "bundle")
    x = np.zeros((1, 1, SIDE, SIDE), np.float32)
    with pytest.raises(PredictionError, match="feature"):
        p.logits(x)
    with pytest.raises(PredictionError, match="PreprocessSpec"):
        p.feature_matrix([{}], ["a"])


# -- bundles round-trip ------------------------------------------------------------------
def test_bundle_round_trip_gives_identical_probabilities(frames, fusion_run, tmp_path):
    original = load_bundle(fusion_run / "bundle")
    zipped = save_bundle(tmp_path / "copy.zip", original.manifest, original.state_dict(),
                         {n: original.verified_bytes(n) for n in original.manifest["files"]
                          if n != "weights.safetensors"})
    files = sorted(str(p) for p in frames["test"].rglob("*.fits"))[:12]
    a = Predictor.load(original).predict_paths(files, include_probs=True)
    b = Predictor.load(zipped).predict_paths(files, include_probs=True)
    assert [r["probs"] for r in a["results"]] == [r["probs"] for r in b["results"]]
    assert Predictor.load(original, backend="onnx").backend.name == "onnx"  # two-input graph


def test_bytes_and_paths_agree(frames, fusion_run):
    p = Predictor.load(fusion_run / "bundle")
    files = sorted(frames["test"].rglob("*.fits"))[:6]
    by_path = p.predict_paths([str(f) for f in files], include_probs=True)["results"]
    by_bytes = p.predict_bytes([f.read_bytes() for f in files], [str(f) for f in files],
                               include_probs=True)
    assert [r["probs"] for r in by_path] == [r["probs"] for r in by_bytes]


# -- the command line --------------------------------------------------------------------
def test_cli_predict_classifies_every_file(frames, fusion_run, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for f in sorted(frames["test"].rglob("*.fits"))[::4]:
        (inbox / f"{f.parent.name}__{f.name}").write_bytes(f.read_bytes())
    (inbox / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b"\0" * 50)
    out = tmp_path / "report.json"
    res = runner.invoke(app, ["predict", str(fusion_run / "bundle"), str(inbox), "--output",
                              str(out), "--backend", "torch", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert len(report["results"]) + len(report["defects"]) == len(list(inbox.iterdir()))
    assert [d["path"] for d in report["defects"]] == [str(inbox / "broken.fits")]
    hits = [Path(r["path"]).name.split("__")[0] == r["class"] for r in report["results"]]
    assert np.mean(hits) >= 0.9


def test_http_service_answers_what_the_predictor_answers(frames, fusion_run):
    pytest.importorskip("fastapi")
    import time

    from fastapi.testclient import TestClient

    from imgtriage.serve import ServeConfig, create_app

    files = sorted(frames["test"].rglob("*.fits"))[::10]
    bundle = fusion_run / "bundle"
    expected = Predictor.load(bundle).predict_bytes([f.read_bytes() for f in files],
                                                     [f.name for f in files],
                                                     include_probs=True)
    app_ = create_app(ServeConfig(bundle=str(bundle), threads=1))
    with TestClient(app_) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        res = client.post("/v1/classify", params={"include_probs": True},
                          files=[("file", (f.name, f.read_bytes(), "application/fits"))
                                 for f in files])
    assert res.status_code == 200, res.text
    got = res.json()["results"]
    assert [r["class"] for r in got] == [r["class"] for r in expected]
    assert [r["probs"] for r in got] == [r["probs"] for r in expected]


# -- feature-branch importance (gradient x input) -----------------------------------------
def test_a_feature_the_network_cannot_see_has_zero_importance():
    from imgtriage.predict.attribution import FeatureAttribution

    torch.manual_seed(0)
    m = create_model("fusion:crop_cnn", num_classes=3, in_chans=1, num_features=4, **SMALL)
    with torch.no_grad():
        m.features[0].weight[:, 2] = 0.0  # feature 2 is cut off from the feature branch
    acc = FeatureAttribution(["a", "b", "blind", "d"])
    rng = np.random.default_rng(0)
    for _ in range(2):
        acc.add(m, rng.normal(size=(8, 1, SIDE, SIDE)).astype(np.float32),
                rng.normal(size=(8, 4)).astype(np.float32))
    imp = acc.result()
    assert imp["blind"] == 0.0
    assert all(v > 0 for k, v in imp.items() if k != "blind")
    assert list(imp.values()) == sorted(imp.values(), reverse=True)
    assert m.training  # the model's mode is left as it was


def test_evaluate_ranks_the_header_card_that_decides_the_label_first(frames, fusion_run,
                                                                     tmp_path):
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(fusion_run / "bundle"), str(frames["test"]),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    imp = report["feature_importance"]
    names = Predictor.load(fusion_run / "bundle").features.feature_names_
    assert set(imp) == set(names)
    assert "EXPTIME" in next(iter(imp))  # the only informative feature comes first
    assert "feature importance" in (out / "report.html").read_text()
