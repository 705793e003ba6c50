import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from imgtriage.data import PreprocessSpec, load_input, to_input
from imgtriage.errors import ConfigError, ImageReadError

IDENTITY1 = {"mean": (0.0,), "std": (1.0,)}
IDENTITY3 = {"mean": (0.0,) * 3, "std": (1.0,) * 3}


def test_dtype_scaling_maps_full_range_to_unit_interval():
    spec = PreprocessSpec(in_chans=1, size=(4, 4), **IDENTITY1)
    for dtype in (np.uint8, np.uint16):
        hi = np.iinfo(dtype).max
        x = to_input(np.full((4, 4), hi, dtype), spec)
        assert x.shape == (1, 4, 4) and np.allclose(x, 1.0)
        assert np.allclose(to_input(np.zeros((4, 4), dtype), spec), 0.0)


def test_16bit_tiff_keeps_precision_that_8bit_would_lose(tmp_path):
    arr = np.array([[1000, 1001], [1002, 1003]], np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    spec = PreprocessSpec(in_chans=1, size=(2, 2), **IDENTITY1)
    x, meta = load_input(tmp_path / "a.tif", spec)
    assert meta["dtype"] == "uint16"
    assert len(np.unique(x)) == 4
    assert np.allclose(x[0], arr / 65535.0, atol=1e-6)


def test_percentile_and_asinh_for_float_data():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 5, (32, 32)).astype(np.float32)
    img[0, 0] = 1e6  # one hot pixel must not squash the rest
    spec = PreprocessSpec(in_chans=1, size=(32, 32), scaling="percentile",
                          percentiles=(1, 99), **IDENTITY1)
    x = to_input(img, spec)[0]
    assert x.max() == pytest.approx(1.0) and x.min() == pytest.approx(0.0)
    assert 0.3 < np.median(x) < 0.7
    lin = to_input(img, spec)
    asinh = to_input(img, PreprocessSpec(in_chans=1, size=(32, 32), scaling="percentile",
                                         percentiles=(1, 99), stretch="asinh", **IDENTITY1))
    mid = (lin > 0.05) & (lin < 0.95)
    assert np.all(asinh[mid] >= lin[mid])  # asinh lifts faint values


def test_channel_rules():
    spec3 = PreprocessSpec(in_chans=3, size=(4, 4), **IDENTITY3)
    spec1 = PreprocessSpec(in_chans=1, size=(4, 4), **IDENTITY1)
    gray = np.full((4, 4), 255, np.uint8)
    assert np.allclose(to_input(gray, spec3), 1.0)  # gray repeated to RGB
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 255
    assert np.allclose(to_input(rgb, spec1), 0.587, atol=1e-3)  # luma weights
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black -> white background
    assert np.allclose(to_input(rgba, spec3), 1.0)
    with pytest.raises(ImageReadError) as exc:
        to_input(np.zeros((4, 4, 5), np.uint8), spec3, path="five.tif")
    assert exc.value.defect.issue == "bad_shape" and "--in-chans 5" in exc.value.defect.message


def test_geometry_modes_give_the_requested_size():
    img = np.arange(60 * 40, dtype=np.float32).reshape(60, 40)
    for mode in ("squash", "shorter_crop", "pad"):
        spec = PreprocessSpec(in_chans=1, size=(16, 24), resize=mode, scaling="minmax",
                              **IDENTITY1)
        assert to_input(img, spec).shape == (1, 16, 24)
    pad = to_input(np.ones((10, 40), np.float32) * 5, PreprocessSpec(
        in_chans=1, size=(40, 40), resize="pad", scaling="dtype", **IDENTITY1))
    assert pad[0, 0, 0] == 0.0 and pad[0, 20, 20] == 0.0  # constant float -> zeros, padded


def test_normalisation_applied():
    spec = PreprocessSpec(in_chans=1, size=(2, 2), mean=(0.5,), std=(0.25,))
    assert np.allclose(to_input(np.full((2, 2), 255, np.uint8), spec), 2.0)


def test_bytes_and_file_give_identical_inputs(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    spec = PreprocessSpec.default_for(3, (32, 32))
    a, _ = load_input(tmp_path / "a.png", spec)
    b, _ = load_input((tmp_path / "a.png").read_bytes(), spec, name="a.png")
    assert np.array_equal(a, b)


def test_jpeg_draft_is_part_of_the_spec(tmp_path):
    rng = np.random.default_rng(2)
    big = rng.integers(0, 255, (800, 1200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG", quality=90)
    (tmp_path / "big.jpg").write_bytes(buf.getvalue())
    fast = PreprocessSpec.default_for(3, (64, 64))
    full = PreprocessSpec.default_for(3, (64, 64), jpeg_draft=False)
    xf, _ = load_input(tmp_path / "big.jpg", fast)
    xs, _ = load_input(tmp_path / "big.jpg", full)
    assert xf.shape == xs.shape == (3, 64, 64)
    assert np.abs(xf - xs).mean() < 0.1  # same picture, decoded at a reduced scale
    spec_back = PreprocessSpec.from_dict(fast.to_dict())
    assert spec_back == fast


@pytest.mark.parametrize("kw, flag", [
    ({"in_chans": 1, "mean": (0.5, 0.5), "std": (0.2,)}, "--mean"),
    ({"size": (0, 4)}, "--img-size"),
    ({"scaling": "zscale"}, "--scaling"),
    ({"percentiles": (50, 10)}, "--percentiles"),
])
def test_spec_validation_names_flags(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        PreprocessSpec(**kw)
