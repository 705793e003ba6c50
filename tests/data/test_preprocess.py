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


def _whole_image_reference(array, spec):
    """The file -> tensor rules written for the whole image at once (floats of every channel)."""
    x = array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) and spec.scaling == "dtype":
        info = np.iinfo(array.dtype)
        x = (x - info.min) / float(info.max - info.min)
    else:
        lo, hi = (np.percentile(x, spec.percentiles) if spec.scaling == "percentile"
                  else (float(x.min()), float(x.max())))
        x = np.clip((x - lo) / float(hi - lo), 0.0, 1.0)
    if spec.stretch == "asinh":
        x = np.arcsinh(spec.asinh_a * x) / np.arcsinh(spec.asinh_a)
    x = x.astype(np.float32)
    x = x if x.ndim == 3 else x[..., None]
    if x.shape[2] in (2, 4) and spec.in_chans in (1, 3):
        alpha = x[..., -1:]
        x = x[..., :-1] * alpha + spec.alpha_background * (1.0 - alpha)
    if x.shape[2] == 1 and spec.in_chans > 1:
        x = np.repeat(x, spec.in_chans, axis=2)
    if x.shape[2] == 3 and spec.in_chans == 1:
        x = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    th, tw = spec.size
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., k]), "F").resize(
        (tw, th), Image.Resampling.BILINEAR)) for k in range(x.shape[2])]
    out = (np.stack(planes, 2) - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std,
                                                                                 np.float32)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("shape,dtype,in_chans,scaling,stretch", [
    ((30, 41, 4), np.uint8, 3, "dtype", "linear"),
    ((30, 41, 2), np.uint16, 3, "minmax", "asinh"),
    ((30, 41), np.float32, 3, "percentile", "linear"),
    ((30, 41, 3), np.int16, 1, "dtype", "asinh"),
    ((30, 41, 4), np.float64, 1, "minmax", "linear"),
])
def test_channel_by_channel_gives_exactly_the_whole_image_values(shape, dtype, in_chans,
                                                                 scaling, stretch):
    rng = np.random.default_rng(3)
    array = (rng.random(shape) * 3000).astype(dtype)
    spec = PreprocessSpec.default_for(in_chans, (12, 17), scaling=scaling, stretch=stretch)
    assert np.array_equal(to_input(array, spec), _whole_image_reference(array, spec))


def test_a_large_rgba_image_costs_a_few_float_planes_not_the_whole_image_as_floats():
    from hostile_files import peak_rss_delta

    array = np.full((3000, 3000, 4), 200, np.uint8)
    plane = 3000 * 3000 * 4  # one channel as float32
    spec = PreprocessSpec.default_for(3, (32, 32))
    x, delta = peak_rss_delta(lambda: to_input(array, spec))
    assert x.shape == (3, 32, 32)
    # Whole-image floats would be 4 planes for the image plus 3-6 for compositing.
    assert delta < 5 * plane, f"to_input took {delta / plane:.1f} float planes"


def test_the_fourth_band_of_a_multispectral_tiff_is_never_taken_for_alpha(tmp_path):
    from imgtriage.data import Sample
    from imgtriage.data.loaders import detect_in_chans
    from imgtriage.data.preprocess import record_pixels
    from imgtriage.io import read_image

    bands = np.zeros((4, 6, 6), np.uint16)
    bands[3] = 65535  # near infrared, bright: as alpha it would turn RGB into the background
    bands[3, :3] = 0
    tifffile.imwrite(tmp_path / "chip.tif", bands, photometric="minisblack",
                     planarconfig="separate")
    assert detect_in_chans([Sample(str(tmp_path / "chip.tif"), "a")]) == 4
    rec = read_image(tmp_path / "chip.tif")
    x = record_pixels(rec, PreprocessSpec(in_chans=4, size=(6, 6), mean=(0.0,) * 4,
                                          std=(1.0,) * 4))
    assert np.array_equal(x, bands / 65535.0)  # every band as it is
    with pytest.raises(ImageReadError, match="4 channels but the model takes 3"):
        record_pixels(rec, PreprocessSpec(in_chans=3, size=(6, 6), **IDENTITY3))
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:3, :, 3] = 0  # transparent top half: composited onto the white background
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert detect_in_chans([Sample(str(tmp_path / "rgba.png"), "a")]) == 3
    x = record_pixels(read_image(tmp_path / "rgba.png"),
                      PreprocessSpec(in_chans=3, size=(6, 6), **IDENTITY3))
    assert np.allclose(x[:, :3], 1.0) and np.allclose(x[:, 3:], 0.0)
