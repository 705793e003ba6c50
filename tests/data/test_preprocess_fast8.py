"""The 8-bit fast path of to_input against the float planes: equal up to float rounding for
every geometry, filter and scaling it takes, and the float planes kept where it would differ."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgtriage.data import PreprocessSpec, load_input, to_input
from imgtriage.data.discovery import Sample
from imgtriage.data.loaders import decode_samples
from imgtriage.data.preprocess import _fast_8bit, float_input


def _levels(fast: np.ndarray, ref: np.ndarray, array: np.ndarray, spec: PreprocessSpec
            ) -> float:
    """The largest difference in raw grey levels of the image (undoing mean/std, the value
    range and, for minmax, the image's span)."""
    std = np.asarray(spec.std, np.float64)[:, None, None]
    d = np.abs(fast.astype(np.float64) - ref) * std / spec.value_range
    span = 255 if spec.scaling == "dtype" else max(int(array.max()) - int(array.min()), 1)
    return float(d.max() * span)


TOL_LEVELS = 0.01  # float rounding (levels resampled then scaled; a window not the whole)


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, PreprocessSpec]:
    h, w = (int(v) for v in rng.integers(1, 160, 2))
    c = int(rng.choice([0, 1, 3]))
    array = rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)
    if rng.random() < 0.5:  # smooth, like a photo
        array = np.sort(array, axis=int(rng.integers(0, 2)))
    in_chans = 3 if c == 3 else int(rng.choice([1, 3]))
    spec = PreprocessSpec.default_for(
        in_chans, tuple(int(v) for v in rng.integers(1, 120, 2)),
        resize=str(rng.choice(["squash", "shorter_crop", "pad"])),
        crop_pct=float(rng.uniform(0.5, 1.0)),
        interpolation=str(rng.choice(["nearest", "bilinear", "bicubic", "area"])),
        scaling=str(rng.choice(["dtype", "minmax"])),
        channel_order="bgr" if in_chans == 3 and rng.random() < 0.3 else "rgb",
        value_range=float(rng.choice([1.0, 255.0])))
    return array, spec


def test_fast_path_equals_the_float_planes_up_to_rounding_for_random_images():
    rng = np.random.default_rng(16)
    for _ in range(150):
        array, spec = _random_case(rng)
        fast = _fast_8bit(array, spec)
        assert fast is not None, spec  # every case drawn here takes the fast path
        ref = float_input(array, spec)
        assert fast.shape == ref.shape and fast.dtype == np.float32
        assert fast.flags.c_contiguous
        assert _levels(fast, ref, array, spec) <= TOL_LEVELS, spec
        assert np.array_equal(to_input(array, spec), fast)


@pytest.mark.parametrize("shape,in_chans,order", [((9, 13), 1, "rgb"), ((9, 13, 1), 3, "rgb"),
                                                  ((9, 13, 3), 3, "bgr")])
@pytest.mark.parametrize("scaling", ["dtype", "minmax"])
def test_without_a_resize_the_fast_path_gives_exactly_the_float_values(shape, in_chans, order,
                                                                       scaling):
    array = np.random.default_rng(1).integers(3, 250, shape, dtype=np.uint8)
    spec = PreprocessSpec.default_for(in_chans, (9, 13), scaling=scaling, channel_order=order,
                                      value_range=255.0 if order == "bgr" else 1.0)
    assert np.array_equal(to_input(array, spec), float_input(array, spec))


def test_a_centre_crop_window_matches_resizing_the_whole_image_and_cropping():
    rng = np.random.default_rng(2)
    array = np.sort(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), axis=1)
    spec = PreprocessSpec.default_for(3, (224, 224), resize="shorter_crop", crop_pct=0.875)
    ref = float_input(array, spec)  # resizes the whole image to 341x256, then crops
    assert _levels(to_input(array, spec), ref, array, spec) <= TOL_LEVELS


@pytest.mark.parametrize("w", [225, 232, 239, 1999])
def test_a_crop_as_wide_as_the_resized_image_stays_inside_it(w):
    """(left + width) * (w / resized width) can exceed w by one ulp: the window is clamped."""
    array = np.sort(np.random.default_rng(w).integers(0, 256, (w + 40, w, 3), np.uint8), 0)
    spec = PreprocessSpec.default_for(3, (224, 224), resize="shorter_crop", crop_pct=1.0)
    ref = float_input(array, spec)
    assert _levels(to_input(array, spec), ref, array, spec) <= TOL_LEVELS


@pytest.mark.parametrize("bands,in_chans,fast", [(4, 3, True), (2, 1, True), (2, 3, True),
                                                (4, 1, False), (2, 2, False), (4, 4, False)])
@pytest.mark.parametrize("scaling", ["dtype", "minmax"])
def test_an_opaque_alpha_takes_the_fast_path_and_changes_nothing(bands, in_chans, fast,
                                                                  scaling):
    rng = np.random.default_rng(bands * 10 + in_chans)
    array = rng.integers(0, 200, (37, 53, bands), dtype=np.uint8)
    array[..., -1] = 255  # opaque: LA/RGBA as many PNGs store photos
    spec = PreprocessSpec.default_for(in_chans, (24, 30), scaling=scaling)
    assert (_fast_8bit(array, spec) is not None) == fast  # 2/4-band models keep their bands
    ref = float_input(array, spec)
    assert _levels(to_input(array, spec), ref, array, spec) <= TOL_LEVELS
    array[3, 4, -1] = 254  # one pixel not opaque: the exact float planes
    assert _fast_8bit(array, spec) is None
    assert np.array_equal(to_input(array, spec), float_input(array, spec))


@pytest.mark.parametrize("array,kw", [
    (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40), {}),  # 16-bit stays float
    (np.full((30, 40, 4), 200, np.uint8), {}),  # alpha is composited in float
    (np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3), {"in_chans": 1}),  # luma
    (np.arange(30 * 40, dtype=np.uint8).reshape(30, 40), {"scaling": "percentile"}),
    (np.arange(30 * 40, dtype=np.uint8).reshape(30, 40), {"stretch": "asinh"}),
    (np.arange(30 * 40, dtype=np.float32).reshape(30, 40), {"scaling": "minmax"}),
])
def test_images_the_fast_path_would_change_keep_the_exact_float_planes(array, kw):
    spec = PreprocessSpec.default_for(kw.pop("in_chans", 3), (17, 11), **kw)
    assert _fast_8bit(array, spec) is None
    assert np.array_equal(to_input(array, spec), float_input(array, spec))


def test_the_training_loader_and_load_input_read_a_photo_to_the_same_tensor(tmp_path):
    """One code path: what training and evaluation decode is what prediction decodes."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(np.sort(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), 0)).save(
        buf, "JPEG", quality=90)
    path = tmp_path / "a.jpg"
    path.write_bytes(buf.getvalue())
    spec = PreprocessSpec.default_for(3, (48, 48), resize="shorter_crop", crop_pct=0.875)
    x, _ = load_input(path, spec)
    assert _fast_8bit(np.asarray(Image.open(path)), spec) is not None
    loaded = decode_samples([Sample(str(path), "a")], ["a"], spec, workers=1)
    assert np.array_equal(loaded.x[0], x)
    assert np.array_equal(load_input(path.read_bytes(), spec, name="a.jpg")[0], x)


def test_a_large_rgb_photo_costs_a_few_float_planes_on_the_fast_path():
    from hostile_files import peak_rss_delta

    array = np.full((3000, 3000, 3), 120, np.uint8)
    array[::7] = 30  # not constant
    plane = 3000 * 3000 * 4  # one channel as float32
    spec = PreprocessSpec.default_for(3, (224, 224), resize="shorter_crop")
    assert _fast_8bit(array, spec) is not None
    x, delta = peak_rss_delta(lambda: to_input(array, spec))
    assert x.shape == (3, 224, 224)
    # Pillow's RGB copy (4 bytes a pixel), its three 8-bit planes, one float plane at a time
    assert delta < 3 * plane, f"to_input took {delta / plane:.1f} float planes"
