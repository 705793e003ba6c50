"""The cascade's OOD gate: images whose first-stage input looks unlike the training data are
not answered by the first stage; they go to stage 2, which answers or refuses them.

Both cascades sit on ``calibrated_run`` (digits, default options: its bundle holds an OOD
rule and refuses noise). The feature cascade's first stage is a logistic regression on image
statistics, the CNN cascade's the calibrated bundle itself; both gated by a route share, so
the confidence gate lets most images through and the OOD gate is what stops the odd ones.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.data import discover, split_dataset
from imgtriage.data.features import FeatureSpec, raw_features
from imgtriage.data.preprocess import PreprocessSpec, load_record
from imgtriage.evaluate.conformal import conformal_quantile
from imgtriage.evaluate.ood import MahalanobisOOD, scorer_from_rule
from imgtriage.predict import Predictor
from imgtriage.predict.cascade import FIRST_STAGE_OOD_FILE, CascadeConfig, build_cascade

OOD = "out_of_distribution"
CONSTANT = ("black", "white", "grey")


def _odd_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"uniform": rng.integers(0, 256, (32, 32), dtype=np.uint8),
            "gauss": np.clip(rng.normal(128, 50, (32, 32)), 0, 255).astype(np.uint8),
            "rgbnoise": rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
            "checker": (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8),
            "black": np.zeros((32, 32), np.uint8), "white": np.full((32, 32), 255, np.uint8),
            "grey": np.full((32, 32), 128, np.uint8)}


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd():
    """{name.png: PNG bytes} of noise, a checkerboard and constant images."""
    return {f"{k}.png": _png(a) for k, a in _odd_arrays().items()}


@pytest.fixture(scope="module")
def odd_folder(odd, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    for name, data in odd.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def cascades(calibrated_run, digits_folder, tmp_path_factory):
    """{"features": logreg cascade, "cnn": CNN-first-stage cascade} (bundle paths)."""
    root = tmp_path_factory.mktemp("cascade_ood")
    b = calibrated_run.bundle_path
    return {"features": build_cascade(b, digits_folder, root / "features",
                                      CascadeConfig(route_share=0.3)).bundle_path,
            "cnn": build_cascade(b, digits_folder, root / "cnn",
                                 CascadeConfig(first_stage=str(b), route_share=0.3)).bundle_path}


def _val_paths(bundle: Path, data: Path) -> list[str]:
    cfg = load_bundle(bundle).manifest["training"]["split"]  # as the cascade split it
    ds = split_dataset(discover(data), val_frac=cfg["val_frac"], test_frac=cfg["test_frac"],
                       seed=cfg["seed"])
    return [s.path for s in ds.samples if s.split == "val"]


@pytest.mark.parametrize("kind", ["features", "cnn"])
def test_odd_images_go_to_stage_two_which_refuses_them(kind, cascades, odd, calibrated_run):
    p = Predictor.load(cascades[kind], num_threads=1)
    items, names = list(odd.values()), list(odd)
    off = p.predict_bytes(items, names, ood_gate=False)
    # without the gate the first stage answers most of them (the test can fail)
    assert sum(r["stage"] == 1 for r in off) >= len(names) // 2, off
    on = p.predict_bytes(items, names)
    assert all(r["stage"] == 2 and r["stage1_ood"] is True for r in on), on
    alone = Predictor.load(calibrated_run.bundle_path, num_threads=1).predict_bytes(items, names)
    for mine, ref in zip(on, alone, strict=True):  # ordinary stage-2 rows
        assert {k: v for k, v in mine.items() if k not in ("stage", "stage1_ood")} == ref
    refused = {n: r["reason"] for n, r in zip(names, on, strict=True)}
    assert all(refused[f"{c}.png"] == OOD for c in CONSTANT), refused
    assert sum(v == OOD for v in refused.values()) >= len(names) - 1, refused


@pytest.mark.parametrize("kind", ["features", "cnn"])
def test_in_distribution_images_still_reach_the_first_stage(kind, cascades, digits_folder,
                                                            odd_folder):
    """With stage 2's abstain rule off (its class thresholds also hold stage-1 answers back),
    the route share's first-stage answers on validation, less those the gate sends on."""
    p = Predictor.load(cascades[kind], num_threads=1)
    val = _val_paths(cascades[kind], digits_folder)
    rep = p.predict_paths([*val, odd_folder], abstain=False)
    rows = {r["path"]: r for r in rep["results"]}
    c = rep["meta"]["cascade"]
    flagged = [r for r in rows.values() if r.get("stage1_ood")]
    assert c["stage1_ood"] == len(flagged) and c["stage1"] + c["stage2"] == len(rows)
    assert c["ood_gate"]["source"] == ("cascade" if kind == "features" else "stage1")
    # every odd image flagged; validation images as the manifest's validation record says
    assert {Path(r["path"]).name for r in flagged if Path(r["path"]).parent == odd_folder} \
        == {p.name for p in odd_folder.iterdir()}
    v = load_bundle(cascades[kind]).manifest["cascade"]["validation"]["ood_gate"]
    assert sum(bool(rows[x].get("stage1_ood")) for x in val) == pytest.approx(
        v["stage1_ood"], abs=0 if kind == "features" else 1)  # torch at build, ONNX here
    # the route share counts the images the OOD gate sends on (one may sit on a boundary)
    assert sum(rows[x]["stage"] == 1 for x in val) == pytest.approx(
        len(val) - round(0.3 * len(val)), abs=1)
    off = p.predict_paths([*val, odd_folder], abstain=False, ood_gate=False)
    assert "stage1_ood" not in off["meta"]["cascade"]
    assert not any("stage1_ood" in r for r in off["results"])
    first = {r["path"] for r in off["results"] if r["stage"] == 1}
    assert {x for x in val if rows[x]["stage"] == 1} == \
        {x for x in val if x in first and not rows[x].get("stage1_ood")}


def test_cnn_first_stage_gate_agrees_across_backends(cascades, odd, digits_folder):
    """torch scores the features output in NumPy, ONNX Runtime in the graph: same routing.
    (Validation digits shifted by a pixel: the stage-1 bundle's thresholds were fitted on
    the images themselves, one of which sits exactly on each, where float noise decides.)"""
    val = _val_paths(cascades["cnn"], digits_folder)
    items = [*odd.values(), *(_png(np.roll(np.asarray(Image.open(v)), 1, axis=1))
                              for v in val)]
    names = [*odd, *val]
    got = {}
    for backend in ("torch", "onnx"):
        p = Predictor.load(cascades["cnn"], backend=backend, num_threads=1)
        got[backend] = [(r["stage"], r.get("stage1_ood"), r["class"], r.get("reason"))
                        for r in p.predict_bytes(items, names)]
    assert got["torch"] == got["onnx"]


def test_feature_gate_stored_then_loaded_gives_the_build_scores(cascades, digits_folder):
    """The validation scores stored at build time are what the loaded gate gives the same
    images decoded at prediction time; the threshold is their conformal quantile."""
    path = Path(cascades["features"])
    m = load_bundle(path).manifest
    gate = m["cascade"]["ood_gate"]
    assert gate["method"] == "mahalanobis" and gate["file"] == FIRST_STAGE_OOD_FILE
    assert m["files"][FIRST_STAGE_OOD_FILE]  # hashed like every file
    p = Predictor.load(path, num_threads=1)
    assert p.describe()["cascade"]["ood_gate"] == {
        "source": "cascade", "method": "mahalanobis", "threshold": gate["threshold"],
        "accept": 0.99}
    stored = p.first.ood
    from safetensors.numpy import load

    again = scorer_from_rule(gate, load((path / FIRST_STAGE_OOD_FILE).read_bytes()))
    spec2 = PreprocessSpec.from_dict(m["preprocess"])
    fspec = FeatureSpec.from_dict(m["features"]["spec"])
    val = _val_paths(path, digits_folder)
    z = p.first.features.transform([raw_features(load_record(v, spec2), fspec) for v in val])
    assert np.allclose(stored.score(z), stored.val_scores_, rtol=1e-10, atol=1e-10)
    assert np.array_equal(again.score(z), stored.score(z))
    q = conformal_quantile(stored.val_scores_, 1 - gate["accept"])
    assert gate["threshold"] == (q if np.isfinite(q) else stored.val_scores_.max())
    assert gate["n_val"] == len(val)


def test_gate_acceptance_matches_its_stated_level():
    """Conformal acceptance: over 40 train/validation/test draws, new in-distribution rows
    are accepted with probability ceil((n + 1) * 0.99) / (n + 1) on average (n validation
    rows), within 4 standard errors; rows far from the data are never accepted."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(12, 12))
    n_val, accept, shares = 400, 0.99, []
    for _ in range(40):
        def draw(n: int) -> np.ndarray:
            return rng.standard_t(6, size=(n, 12)) @ mix + 3.0
        ood = MahalanobisOOD(accept).fit(draw(300), draw(n_val))
        shares.append(float(np.mean(ood.score(draw(2000)) <= ood.threshold_)))
        assert not (ood.score(rng.uniform(-40, 40, (50, 12))) <= ood.threshold_).any()
    expected = np.ceil((n_val + 1) * accept) / (n_val + 1)
    a, b = np.ceil((n_val + 1) * accept), n_val + 1 - np.ceil((n_val + 1) * accept)
    sd = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)) + expected * (1 - expected) / 2000)
    assert abs(np.mean(shares) - expected) <= 4 * sd / np.sqrt(len(shares)), shares


def test_fresh_digits_pass_the_feature_gate_at_its_level(cascades, tmp_path):
    """New in-distribution images: accepted at least at the gate's guaranteed level,
    within a binomial tolerance (the threshold rests on the validation images)."""
    from shared_helpers import write_digits_folder

    fresh = write_digits_folder(tmp_path / "fresh", per_class=20, seed=7)
    p = Predictor.load(cascades["features"], num_threads=1)
    rows = p.predict_paths([fresh])["results"]
    c = load_bundle(cascades["features"]).manifest["cascade"]
    n = c["ood_gate"]["n_val"]
    level = c["validation"]["ood_gate"]["guaranteed_acceptance"]
    assert level == min(np.ceil((n + 1) * 0.99), n) / (n + 1) <= 0.99
    share = 1 - sum(bool(r.get("stage1_ood")) for r in rows) / len(rows)
    assert share >= level - 3 * np.sqrt(level * (1 - level) / len(rows)), share


def _strip_gate(bundle: Path, dest: Path) -> Path:
    """A cascade as built before the gate: no ood_gate key, no gate file."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["cascade"].pop("ood_gate")
    m["cascade"]["validation"].pop("ood_gate")
    m["metrics"].pop("ood_gate", None)
    if m["files"].pop(FIRST_STAGE_OOD_FILE, None) is not None:
        (dest / FIRST_STAGE_OOD_FILE).unlink()
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


@pytest.mark.parametrize("kind", ["features", "cnn"])
def test_a_cascade_built_before_the_gate_behaves_as_before(kind, cascades, odd_folder,
                                                           digits_folder, tmp_path):
    old = Predictor.load(_strip_gate(Path(cascades[kind]), tmp_path / "old"), num_threads=1)
    new = Predictor.load(cascades[kind], num_threads=1)
    assert old.ood_gate is None and old.describe()["cascade"]["ood_gate"] is None
    paths = [*_val_paths(cascades[kind], digits_folder), str(odd_folder)]
    a = old.predict_paths(paths, include_probs=True)
    b = new.predict_paths(paths, include_probs=True, ood_gate=False)
    assert a["results"] == b["results"]
    assert not any("stage1_ood" in r for r in a["results"])
    assert "stage1_ood" not in a["meta"]["cascade"] and "ood_gate" not in a["meta"]["cascade"]
    odd_rows = [r for r in a["results"] if Path(r["path"]).parent == odd_folder]
    assert sum(r["stage"] == 1 for r in odd_rows) >= len(odd_rows) // 2


def test_no_ood_gate_option_and_cli_predict_and_inspect(calibrated_run, digits_folder,
                                                        odd_folder, tmp_path):
    from imgtriage.cli.main import app

    runner = CliRunner()
    b = calibrated_run.bundle_path
    res = runner.invoke(app, ["cascade", str(b), str(digits_folder), "--out",
                              str(tmp_path / "c"), "--route-share", "0.3"])
    assert res.exit_code == 0, res.output
    assert "OOD gate:" in res.output and "go to stage 2" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "c")])
    assert res.exit_code == 0 and "OOD gate mahalanobis" in res.output, res.output
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["predict", str(tmp_path / "c"), str(odd_folder), "--output",
                              str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    meta, rows = lines[0], [x for x in lines[1:] if x["kind"] == "result"]
    api = {r["path"]: r for r in Predictor.load(tmp_path / "c", num_threads=1)
           .predict_paths([odd_folder])["results"]}
    assert meta["cascade"]["stage1_ood"] == len(rows) == len(api)
    for r in rows:
        ref = api[r["path"]]
        assert (json.loads(r["stage"]), json.loads(r["stage1_ood"]), r["reason"],
                r["class"]) == (ref["stage"], ref["stage1_ood"], ref["reason"], ref["class"])
    res = runner.invoke(app, ["cascade", str(b), str(digits_folder), "--out",
                              str(tmp_path / "plain"), "--route-share", "0.3",
                              "--no-ood-gate"])
    assert res.exit_code == 0 and "OOD gate: none (--no-ood-gate)" in res.output, res.output
    m = load_bundle(tmp_path / "plain").manifest
    assert m["cascade"]["ood_gate"] is None and FIRST_STAGE_OOD_FILE not in m["files"]
    rows = Predictor.load(tmp_path / "plain", num_threads=1).predict_paths([odd_folder])
    assert sum(r["stage"] == 1 for r in rows["results"]) >= len(rows["results"]) // 2
