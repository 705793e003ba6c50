"""The Python API: bundle defaults, per-call overrides, bytes and arrays that never raise."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from predict_helpers import copy_bundle

from imgtriage.bundle import load_bundle, update_bundle
from imgtriage.data.preprocess import load_input
from imgtriage.errors import ConfigError, PredictionError
from imgtriage.evaluate.decision import softmax
from imgtriage.predict import PredictOptions, Predictor


@pytest.fixture(scope="module")
def strict_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with temperature 2 by default and a 'strict' profile (abstain at 0.99)."""
    b = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("strict") / "b")
    dec = load_bundle(b).manifest["decision"]
    strict = {**dec, "thresholds": [0.99] * 10, "abstain": True, "profile": "strict",
              "unknown_label": "review"}
    update_bundle(b, {"decision": {**dec, "temperature": 2.0}, "profiles": {"strict": strict}},
                  note="test profiles")
    return b


@pytest.fixture(scope="module")
def digits(digits_folder):
    paths = [str(p) for c in (1, 4, 7) for p in sorted((digits_folder / f"d{c}").glob("*.png"))[:3]]
    return paths


def _logits(p: Predictor, paths):
    return p.logits(np.stack([load_input(f, p.spec)[0] for f in paths]))


def test_bundle_decision_applies_by_default_and_overrides_per_call(strict_bundle, digits):
    p = Predictor.load(strict_bundle, backend="torch")
    z = _logits(p, digits)
    default = p.predict_paths(digits, include_probs=True)
    assert default["meta"]["temperature"] == 2.0
    for r, zi in zip(default["results"], z, strict=True):
        assert [r["probs"][c] for c in p.classes] == pytest.approx(softmax(zi[None], 2.0)[0],
                                                                    abs=1e-6)
    hot = p.predict_paths(digits, include_probs=True, temperature=0.5)
    assert hot["meta"]["temperature"] == 0.5
    assert [r["score"] for r in hot["results"]] == pytest.approx(
        softmax(z, 0.5).max(axis=1), abs=1e-6)
    everything_unknown = p.predict_paths(digits, thresholds=(1.0,) * 10, abstain=True)
    assert all(r["abstained"] and r["class"] == "unknown"
               for r in everything_unknown["results"])
    assert everything_unknown["meta"]["coverage"] == 0.0
    assert p.predict_paths(digits)["meta"]["coverage"] == 1.0  # the override did not stick


def test_profiles_and_their_errors(strict_bundle, digits):
    p = Predictor.load(strict_bundle, backend="torch")
    strict = p.predict_paths(digits, profile="strict")
    assert strict["meta"]["profile"] == "strict"
    scores = softmax(_logits(p, digits), 1.0).max(axis=1)
    assert [r["abstained"] for r in strict["results"]] == list(scores < 0.99)
    assert {r["class"] for r in strict["results"] if r["abstained"]} <= {"review"}
    assert p.predict_paths(digits, profile="strict", abstain=False)["meta"]["coverage"] == 1.0
    with pytest.raises(PredictionError, match="strict"):
        p.predict_paths(digits, profile="lenient")
    with pytest.raises(ConfigError, match="--thresholds"):
        p.predict_paths(digits, thresholds=(0.5, 0.5))
    with pytest.raises(TypeError):
        PredictOptions(colour="blue")  # type: ignore[call-arg]


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_bytes_is_aligned_and_never_raises(tiny_bundle, digits, monkeypatch):
    p = Predictor.load(tiny_bundle, backend="torch")
    good = Path(digits[0]).read_bytes()
    items = [good, b"", b"GIF89a broken", good, b"\x00" * 20]
    names = ["a.png", "b.png", "c.gif", "d.png", "e.bin"]
    out = p.predict_bytes(items, names)
    assert [o.get("issue") for o in out] == [None, "empty_file", "truncated", None,
                                            "unsupported_format"]
    assert [o["path"] for o in out] == names
    assert out[0]["class"] == out[3]["class"] and out[0]["score"] == out[3]["score"]
    import imgtriage.predict.base as mod

    real = mod.load_record

    def flaky(src, spec, name=None):
        if name == "d.png":
            raise RuntimeError("decoder bug")
        return real(src, spec, name=name)

    monkeypatch.setattr(mod, "load_record", flaky)
    out = p.predict_bytes([good, good], ["c.png", "d.png"])
    assert out[0]["class"] and out[1]["issue"] == "decode_error" and "decoder bug" in \
        out[1]["message"]


def test_one_path_or_one_file_s_bytes_is_taken_as_one_item(tiny_bundle, digits):
    """A single path is that path, never its characters (whose '/' would walk the disk)."""
    p = Predictor.load(tiny_bundle, backend="torch")
    folder = str(Path(digits[0]).parent)
    for given in (folder, Path(folder)):
        report = p.predict_paths(given)
        assert len(report["results"]) == len(list(Path(folder).iterdir()))
        assert not report["defects"]
    one = p.predict_bytes(Path(digits[0]).read_bytes(), names="a.png")
    assert len(one) == 1 and one[0]["path"] == "a.png" and "class" in one[0]
    with pytest.raises(PredictionError, match=r"2 item.* but 1 name"):
        p.predict_bytes([b"", b""], names=["a.png"])


def test_decode_then_predict_decoded_equals_predict_bytes(tiny_bundle, digits):
    """The service's two halves: decode uploads per request, classify them in one batch."""
    from imgtriage.predict import Decoded

    p = Predictor.load(tiny_bundle, backend="torch")
    files = [Path(f).read_bytes() for f in digits[:3]]
    first = p.decode_bytes([files[0], b"not an image"], ["a.png", "junk.png"])
    second = p.decode_bytes(files[1:], ["b.png", "c.png"])
    assert [type(e) for e in first] == [Decoded, dict] and first[1]["issue"]
    assert first[0].x.shape == (p.spec.in_chans, *p.spec.size) and first[0].name == "a.png"
    merged = p.predict_decoded(first + second, include_probs=True, topk=2)
    whole = p.predict_bytes([files[0], b"not an image", *files[1:]],
                            ["a.png", "junk.png", "b.png", "c.png"], include_probs=True, topk=2)
    assert [r["path"] for r in merged] == ["a.png", "junk.png", "b.png", "c.png"]
    assert merged[1] == whole[1]  # the defect passes through in its place
    for got, want in zip(merged, whole, strict=True):
        assert got.keys() == want.keys() and got.get("class") == want.get("class")
        if "probs" in want:
            assert np.allclose(list(got["probs"].values()), list(want["probs"].values()),
                               atol=1e-5)
    assert p.predict_decoded([first[1]]) == [first[1]]  # nothing to compute: no model call


def test_predict_arrays_handles_any_dtype_and_refuses_bad_shapes(tiny_bundle, digits):
    p = Predictor.load(tiny_bundle, backend="torch")
    img = np.asarray(Image.open(digits[0]))
    nan = img.astype(np.float32)
    nan[0, :5] = np.nan
    arrays = [img, nan, np.zeros(7), np.full((32, 32), 9, np.uint16),
              np.array([["a"]]), np.dstack([img] * 3)]
    out = p.predict_arrays(arrays)
    issues = [o.get("issue") for o in out]
    assert issues == [None, None, "bad_shape", None, "bad_shape", None]
    assert out[3]["flags"] == ["degenerate"] and "flags" not in out[0]
    assert out[0]["class"] == out[5]["class"] == p.predict_bytes([_png(img)])[0]["class"]
    assert all(np.isfinite(o["score"]) for o in out if "score" in o)


def test_tta_averages_the_bundles_views_and_probs_topk(tiny_bundle, digits):
    p = Predictor.load(tiny_bundle, backend="torch")
    x = np.stack([load_input(f, p.spec)[0] for f in digits])
    views = [x, x[..., ::-1]]  # the tiny bundle's policy: hflip
    assert p.tta_transforms == ["hflip"]
    expected = softmax(np.mean([p.backend(np.ascontiguousarray(v)) for v in views], axis=0))
    rows = p.rows_for_inputs(x, digits, PredictOptions(tta=True, include_probs=True, topk=3))
    for r, e in zip(rows, expected, strict=True):
        assert [r["probs"][c] for c in p.classes] == pytest.approx(e, abs=1e-6)
        assert [t["score"] for t in r["topk"]] == pytest.approx(sorted(e, reverse=True)[:3],
                                                                abs=1e-6)
        assert r["topk"][0]["class"] == r["class"]
    assert p.rows_for_inputs(x[:0], [], PredictOptions()) == []
    report = p.predict_paths(digits, tta=True)
    assert report["meta"]["tta"] is True


def test_describe_says_what_serving_needs(tiny_bundle):
    d = Predictor.load(tiny_bundle, backend="torch").describe()
    assert d["backend"] == "torch" and d["precision"] == "fp32"
    assert d["classes"] == [f"d{i}" for i in range(10)] and len(d["bundle_sha256"]) == 64


def test_truncated_fits_is_a_flagged_result(tiny_bundle, tmp_path):
    """Issue 19: a FITS file cut inside its data is classified from the rows it has, and the
    row says so (flags: partial); one with too few rows stays a truncated defect."""
    from astropy.io import fits

    frame = np.random.default_rng(0).normal(1000, 50, (64, 64)).astype(np.float32)
    fits.PrimaryHDU(frame).writeto(tmp_path / "whole.fits")
    raw = (tmp_path / "whole.fits").read_bytes()
    start, row = 2880, 64 * 4
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "most.fits").write_bytes(raw[:start + 48 * row])
    (tmp_path / "in" / "little.fits").write_bytes(raw[:start + 10 * row])
    report = Predictor.load(tiny_bundle).predict_paths([tmp_path / "in"])
    (row_,) = report["results"]
    assert row_["path"].endswith("most.fits") and row_["flags"] == ["partial"]
    assert [d["issue"] for d in report["defects"]] == ["truncated"]
