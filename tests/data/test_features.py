"""Image-statistics and header features: values, channel rules, missing cards, scaling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from imgtriage.data.features import (
    FeatureSpec,
    FeatureStandardizer,
    FieldSpec,
    RawFeatures,
    column_groups,
    extract_features,
    raw_features,
    read_extra_columns,
)
from imgtriage.errors import ConfigError, DataError, ImageReadError
from imgtriage.io import ImageRecord, read_image

STATS_ONLY = FeatureSpec(header_cards=())


def _stats(array: np.ndarray, spec: FeatureSpec = STATS_ONLY, meta: dict | None = None
           ) -> dict[str, float]:
    raw = raw_features(ImageRecord(array, meta or {}), spec)
    return dict(zip(spec.stat_names(), raw.stats.tolist(), strict=True))


def test_integer_images_agree_across_bit_depths():
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 200, (48, 40), dtype=np.uint8)
    a, b = _stats(img8), _stats(img8.astype(np.uint16) * 257)
    for name in ("c0_mean", "c0_std", "c0_p50", "c0_p99", "c0_skew", "c0_entropy", "cv",
                 "local_var_ratio", "grad_ratio", "glcm_contrast"):
        assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    assert (a["bit_depth"], b["bit_depth"]) == (8.0, 16.0)
    assert a["log2_height"] == pytest.approx(np.log2(48))
    assert a["log_aspect"] == pytest.approx(np.log(40 / 48))


def test_moments_and_percentiles_match_numpy():
    x = np.random.default_rng(1).random((50, 30)).astype(np.float32)
    s = _stats(x, FeatureSpec(header_cards=(), max_side=64))
    flat = x.astype(np.float64).ravel()
    z = (flat - flat.mean()) / flat.std()
    assert s["c0_mean"] == pytest.approx(flat.mean(), rel=1e-6)
    assert s["c0_p5"] == pytest.approx(np.percentile(flat, 5), rel=1e-6)
    assert s["c0_skew"] == pytest.approx((z ** 3).mean(), abs=1e-5)
    assert s["c0_kurtosis"] == pytest.approx((z ** 4).mean() - 3, abs=1e-5)
    assert s["is_float"] == 1.0


def test_saturation_is_share_at_dtype_max_or_image_max():
    img = np.full((20, 20), 100, np.uint8)
    img[:5] = 255  # a quarter at the dtype maximum
    assert _stats(img)["c0_saturated"] == pytest.approx(0.25)
    flt = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    flt[:2] = 7.5  # a tenth at the image maximum
    assert _stats(flt)["c0_saturated"] == pytest.approx(0.1)


def test_constant_checkerboard_and_noise_extremes():
    flat = _stats(np.full((16, 16), 9, np.uint8))
    assert [flat[k] for k in ("c0_std", "c0_skew", "c0_kurtosis", "c0_entropy", "cv",
                              "glcm_contrast")] == [0.0] * 6
    board = _stats((np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8))
    assert board["glcm_contrast"] == pytest.approx(1.0)
    assert board["glcm_homogeneity"] == pytest.approx(1 / 16)
    assert board["c0_entropy"] == pytest.approx(1.0)
    noise = _stats(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8))
    assert noise["c0_entropy"] > 7.8
    assert noise["local_var_ratio"] > 0.8  # speckle: local variance ~ 8/9 of the global
    ramp = _stats(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)))
    assert ramp["local_var_ratio"] < 0.01


def test_channel_rules_and_chroma():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    rgb3 = FeatureSpec(channels=3, header_cards=())
    s = _stats(gray, rgb3)
    assert s["c0_mean"] == s["c1_mean"] == s["c2_mean"] and s["chroma"] == 0.0
    color = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    rgba = np.concatenate([color, np.full((20, 20, 1), 255, np.uint8)], axis=2)
    with_alpha, without = _stats(rgba, rgb3), _stats(color, rgb3)
    assert (with_alpha.pop("channels"), without.pop("channels")) == (4.0, 3.0)
    assert with_alpha == without  # alpha is not a colour channel
    assert _stats(color)["chroma"] > 0.1
    assert _stats(color)["c0_mean"] == pytest.approx(color.mean() / 255, rel=1e-5)
    with pytest.raises(ImageReadError, match="channels") as err:
        _stats(rng.random((8, 8, 5)), rgb3)
    assert err.value.defect.issue == "bad_shape"


def test_size_features_undo_jpeg_draft_and_large_images_are_strided():
    big = np.random.default_rng(4).random((1000, 2000))
    s = _stats(big, meta={"jpeg_draft_scale": 4})
    assert (s["log2_height"], s["log2_width"]) == pytest.approx((np.log2(4000), np.log2(8000)))
    assert s["c0_mean"] == pytest.approx(big.mean(), abs=0.02)


def _fits_record(tmp_path, name: str, cards: dict, value: int = 100) -> ImageRecord:
    hdu = fits.PrimaryHDU(np.full((8, 8), value, np.uint16))
    for key, v in cards.items():
        hdu.header[key] = v
    path = tmp_path / f"{name}.fits"
    hdu.writeto(path)
    return read_image(path)


def test_missing_header_cards_are_imputed_with_the_training_median_and_flagged(tmp_path):
    spec = FeatureSpec(stats=("moments",))
    train = [_fits_record(tmp_path, f"t{i}", {"EXPTIME": t, "IMAGETYP": kind})
             for i, (t, kind) in enumerate([(10.0, "LIGHT"), (20.0, "DARK"), (60.0, "LIGHT")])]
    fx = FeatureStandardizer(spec).fit([raw_features(r, spec) for r in train])
    assert fx.vocabulary_["IMAGETYP"] == ["LIGHT", "DARK"]
    odd = _fits_record(tmp_path, "odd", {"OBSTYPE": "FLAT"})  # no EXPTIME; IMAGETYP alias
    bare = _fits_record(tmp_path, "bare", {})
    z = fx.transform([raw_features(r, spec) for r in (odd, bare)])
    unscaled = z * fx.std_ + fx.mean_
    col = {n: unscaled[:, i] for i, n in enumerate(fx.feature_names_)}
    assert col["EXPTIME"].tolist() == [20.0, 20.0]  # the training median, not zero
    assert col["EXPTIME__missing"].tolist() == [1.0, 1.0]
    assert col["IMAGETYP=__other__"].tolist() == [1.0, 0.0]  # FLAT: present, unseen value
    assert col["IMAGETYP__missing"].tolist() == [0.0, 1.0]
    values, missing = extract_features(bare, spec, vocabulary=fx.vocabulary_)
    names = [n for _, ns in column_groups(spec, fx.vocabulary_) for n in ns]
    assert missing[names.index("EXPTIME")] and np.isnan(values[names.index("EXPTIME")])
    assert not missing[names.index("c0_mean")]


def test_standardizer_is_fitted_on_training_rows_and_survives_json():
    rng = np.random.default_rng(5)
    spec = FeatureSpec(stats=("moments", "entropy"), header_cards=(FieldSpec("GAIN"),))
    recs = [ImageRecord(rng.integers(0, 256, (10, 10), dtype=np.uint8),
                        {"header": {"GAIN": float(g)} if g % 3 else {}}) for g in range(12)]
    raws = [raw_features(r, spec) for r in recs]
    fx = FeatureStandardizer(spec).fit(raws[:8])
    z_train = fx.transform(raws[:8])
    varying = z_train.std(axis=0) > 0
    assert np.allclose(z_train.mean(axis=0), 0, atol=1e-9)
    assert np.allclose(z_train.std(axis=0)[varying], 1)
    again = FeatureStandardizer.from_dict(json.loads(json.dumps(fx.to_dict())))
    assert np.array_equal(again.transform(raws[8:]), fx.transform(raws[8:]))
    assert again.feature_names_ == fx.feature_names_
    bad = fx.to_dict() | {"mean": fx.to_dict()["mean"][:-1]}
    with pytest.raises(ConfigError, match="inconsistent"):
        FeatureStandardizer.from_dict(bad)
    with pytest.raises(ConfigError, match="not fitted"):
        FeatureStandardizer(spec).transform(raws)


def test_category_vocabulary_is_capped_and_ranked():
    spec = FeatureSpec(stats=(), header_cards=(FieldSpec("FILTER", kind="category"),),
                       max_categories=2)
    raws = [RawFeatures(np.zeros(0), (v,)) for v in ["R", "V", "V", "B", "B", "B", None]]
    fx = FeatureStandardizer(spec).fit(raws)
    assert fx.vocabulary_ == {"FILTER": ["B", "V"]}
    assert fx.feature_names_ == ["FILTER=B", "FILTER=V", "FILTER=__other__",
                                 "FILTER__missing", "stats__missing"]


def test_spec_validation_and_round_trip():
    with pytest.raises(ConfigError, match="statistic groups"):
        FeatureSpec(stats=("colour",))
    with pytest.raises(ConfigError, match="distinct"):
        FeatureSpec(header_cards=("GAIN",), extra_columns=("GAIN",))
    with pytest.raises(ConfigError, match="kind"):
        FieldSpec("X", kind="text")
    spec = FeatureSpec(channels=3, extra_columns=("airmass",))
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_extra_columns_from_a_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,airmass,site\na.png,x,1.2,north\n"
                                    "b.png,y,NA,south\n")
    extras = read_extra_columns(tmp_path / "m.csv", ["airmass", "site"])
    assert extras[str(tmp_path / "a.png")] == {"airmass": "1.2", "site": "north"}
    spec = FeatureSpec(stats=(), header_cards=(),
                       extra_columns=("airmass", FieldSpec("site", kind="category")))
    rec = ImageRecord(np.zeros((4, 4), np.uint8), {})
    fields = [raw_features(rec, spec, extras[str(tmp_path / n)]).fields for n in ("a.png", "b.png")]
    assert fields == [(1.2, "north"), (None, "south")]
    with pytest.raises(DataError, match="lacks columns"):
        read_extra_columns(tmp_path / "m.csv", ["seeing"])


def test_real_fits_headers(shared_fits):
    rec = read_image(shared_fits / "M13_blue_0001.fits")
    raw = raw_features(rec, FeatureSpec(stats=("moments",)))
    by_name = dict(zip([f.name for f in FeatureSpec().fields], raw.fields, strict=True))
    assert by_name["EXPTIME"] == pytest.approx(float(rec.meta["header"]["EXPTIME"]))
    assert isinstance(by_name["IMAGETYP"], str) and by_name["IMAGETYP"]


@pytest.fixture
def shared_fits():
    path = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "fits-samples"
    if not path.exists():
        pytest.skip(f"{path} not present (tests that need ../shared skip without it)")
    return path


def _u8_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(1, 90, 2))
    shape = (h, w, int(rng.choice([1, 2, 3, 4])))
    if kind == "uniform":
        a = rng.integers(0, 256, shape)
    elif kind == "constant":
        a = np.full(shape, rng.integers(0, 256))
    elif kind == "two_valued":
        a = rng.choice([0, 255], shape)
    elif kind == "narrow":
        a = np.clip(rng.normal(128, 3, shape), 0, 255)
    else:
        a = rng.integers(250, 256, shape)
    return a.astype(np.uint8)


@pytest.mark.parametrize("kind", ["uniform", "constant", "two_valued", "narrow", "near_top"])
def test_uint8_histogram_path_equals_the_float_path(kind):
    """8-bit images take the histogram shortcut; its statistics must be the general path's
    (moments, percentiles, shape, saturation, entropy), whatever the value distribution."""
    from imgtriage.data import _image_stats as stats

    rng = np.random.default_rng(len(kind))
    for _ in range(20):
        raw = stats._color_channels(stats.strided(_u8_image(kind, rng), 64), {})
        x = stats._to_float(raw)
        with np.errstate(over="ignore", invalid="ignore"):
            general = stats._per_channel(x, stats._saturated(raw), stats.STAT_GROUPS, True)
        fast = stats._per_channel_u8(raw, stats.STAT_GROUPS)
        np.testing.assert_allclose(fast, general, rtol=1e-4, atol=1e-4)  # float32 there


def test_statistics_keep_the_fourth_band_of_a_multispectral_tiff(tmp_path):
    import tifffile

    from imgtriage.data._image_stats import image_stats
    from imgtriage.io import read_image

    bands = np.full((8, 8, 4), 1000, np.uint16)
    bands[..., 3] = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # NIR varies
    tifffile.imwrite(tmp_path / "chip.tif", bands, photometric="minisblack", planarconfig="contig")
    rec = read_image(tmp_path / "chip.tif")
    stats = image_stats(rec.array, rec.meta, ("moments",), 4, 8).reshape(4, 2)
    assert stats[3, 1] > 0 and np.allclose(stats[:3, 1], 0)  # the NIR band's spread is there
