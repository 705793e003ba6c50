"""PIL formats: exact round trips, mode rules, EXIF orientation, JPEG draft decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imgtriage.io import ReadPolicy, read_image
from imgtriage.io._raster import mode_to_array

REQUIRED_META = {"format", "dtype", "shape", "channels", "nonfinite", "degenerate", "conversions"}


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def _check_meta(rec, fmt: str) -> None:
    meta = rec.meta
    assert REQUIRED_META | {"bytes", "mode", "exif_orientation"} <= set(meta)
    assert meta["format"] == fmt
    assert meta["dtype"] == str(rec.array.dtype)
    assert meta["shape"] == list(rec.array.shape)
    assert meta["channels"] == (1 if rec.array.ndim == 2 else rec.array.shape[-1])
    assert meta["nonfinite"] == 0
    json.dumps(meta)  # metadata goes into JSON reports as it is
    assert rec.array.flags.c_contiguous and rec.array.flags.writeable


@pytest.mark.parametrize(
    ("mode", "shape"), [("L", (12, 17)), ("RGB", (12, 17, 3)), ("RGBA", (12, 17, 4))]
)
def test_png_8bit_round_trip_is_exact(tmp_path, mode, shape):
    pixels = _rng().integers(0, 256, shape, dtype=np.uint8)
    path = _save(Image.fromarray(pixels, mode), tmp_path / "x.png")
    rec = read_image(path)
    assert rec.array.dtype == np.uint8
    np.testing.assert_array_equal(rec.array, pixels)
    assert rec.meta["mode"] == mode
    assert rec.meta["conversions"] == []
    assert rec.meta["bytes"] == path.stat().st_size
    _check_meta(rec, "png")


def test_png_16bit_gray_keeps_uint16_values(tmp_path):
    pixels = _rng().integers(0, 65536, (9, 11), dtype=np.uint16)
    pixels[0, 0] = 65535
    path = _save(Image.fromarray(pixels), tmp_path / "deep.png")
    rec = read_image(path)
    assert rec.meta["mode"].startswith("I;16")
    assert rec.array.dtype == np.uint16
    np.testing.assert_array_equal(rec.array, pixels)
    _check_meta(rec, "png")


def _palette_image(indices: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    palette = np.array([[i, 255 - i, (3 * i) % 256] for i in range(256)], np.uint8)
    img = Image.fromarray(indices, "L").convert("P")
    img.putpalette(palette.ravel().tolist())
    return img, palette


def test_palette_png_without_transparency_becomes_rgb(tmp_path):
    indices = _rng().integers(0, 256, (10, 10), dtype=np.uint8)
    img, palette = _palette_image(indices)
    rec = read_image(_save(img, tmp_path / "pal.png"))
    assert rec.meta["mode"] == "P"
    assert "palette->RGB" in rec.meta["conversions"]
    np.testing.assert_array_equal(rec.array, palette[indices])


def test_palette_png_with_transparency_becomes_rgba(tmp_path):
    indices = _rng().integers(0, 256, (10, 10), dtype=np.uint8)
    img, palette = _palette_image(indices)
    rec = read_image(_save(img, tmp_path / "pal.png", transparency=int(indices[0, 0])))
    assert "palette->RGBA" in rec.meta["conversions"]
    assert rec.array.shape == (10, 10, 4)
    np.testing.assert_array_equal(rec.array[..., :3], palette[indices])
    alpha = np.where(indices == indices[0, 0], 0, 255)
    np.testing.assert_array_equal(rec.array[..., 3], alpha)


def test_bilevel_png_becomes_0_255(tmp_path):
    bits = _rng().integers(0, 2, (8, 16)).astype(bool)
    rec = read_image(_save(Image.fromarray(bits), tmp_path / "bits.png"))
    assert rec.meta["mode"] == "1"
    assert rec.array.dtype == np.uint8 and rec.array.shape == (8, 16)
    np.testing.assert_array_equal(rec.array, np.where(bits, 255, 0))


def test_gray_alpha_png_keeps_two_channels(tmp_path):
    pixels = _rng().integers(0, 256, (6, 7, 2), dtype=np.uint8)
    rec = read_image(_save(Image.fromarray(pixels, "LA"), tmp_path / "la.png"))
    assert rec.meta["mode"] == "LA" and rec.meta["channels"] == 2
    np.testing.assert_array_equal(rec.array, pixels)


def _halves(height: int, width: int) -> np.ndarray:
    """Left half dark, right half bright, top rows mid-gray: survives JPEG, shows rotation."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, width // 2 :] = 230
    img[: height // 4] = 120
    return img


def test_jpeg_exif_orientation_6_is_rotated_upright(tmp_path):
    stored = _halves(40, 64)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(stored), tmp_path / "phone.jpg", exif=exif, quality=95)
    rec = read_image(path)
    assert rec.array.shape == (64, 40, 3)  # height and width swapped
    assert rec.meta["exif_orientation"] == 6
    assert "exif_transpose" in rec.meta["conversions"]
    expected = np.rot90(stored, k=-1)  # orientation 6: rotate 90 degrees clockwise to view
    assert np.abs(rec.array.astype(int) - expected).mean() < 4
    _check_meta(rec, "jpeg")


def test_png_exif_orientation_is_applied_too(tmp_path):
    stored = _rng().integers(0, 256, (4, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8
    rec = read_image(_save(Image.fromarray(stored), tmp_path / "o.png", exif=exif))
    assert rec.meta["exif_orientation"] == 8
    np.testing.assert_array_equal(rec.array, np.rot90(stored, k=1))  # 8: 90 degrees CCW


def test_jpeg_without_exif_is_upright(tmp_path):
    stored = _halves(40, 64)
    rec = read_image(_save(Image.fromarray(stored), tmp_path / "plain.jpg", quality=95))
    assert rec.array.shape == (40, 64, 3)
    assert rec.meta["exif_orientation"] == 1
    assert "exif_transpose" not in rec.meta["conversions"]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    img = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red in CMYK
    rec = read_image(_save(img, tmp_path / "print.jpg"))
    assert rec.meta["mode"] == "CMYK"
    assert "cmyk->rgb" in rec.meta["conversions"]
    assert rec.array.shape == (12, 16, 3)
    red, green, blue = rec.array.reshape(-1, 3).mean(axis=0)
    assert red > 240 and green < 15 and blue < 15


def test_gif_reads_the_first_frame(tmp_path):
    frames = []
    for value in (3, 200):
        frame = Image.new("P", (8, 6), value)
        frame.putpalette([c for i in range(256) for c in (i, 255 - i, i // 2)])
        frames.append(frame)
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    rec = read_image(path)
    assert rec.meta["frames"] == 2
    assert "first_frame_of_2" in rec.meta["conversions"]
    np.testing.assert_array_equal(rec.array[0, 0], [3, 252, 1])
    _check_meta(rec, "gif")


def test_bmp_round_trip_is_exact(tmp_path):
    pixels = _rng().integers(0, 256, (5, 9, 3), dtype=np.uint8)
    rec = read_image(_save(Image.fromarray(pixels), tmp_path / "x.bmp"))
    np.testing.assert_array_equal(rec.array, pixels)
    _check_meta(rec, "bmp")


def test_lossless_webp_round_trip_is_exact(tmp_path):
    pixels = _rng().integers(0, 256, (10, 14, 3), dtype=np.uint8)
    rec = read_image(_save(Image.fromarray(pixels), tmp_path / "x.webp", lossless=True))
    np.testing.assert_array_equal(rec.array, pixels)
    _check_meta(rec, "webp")


def test_jpeg_draft_decodes_smaller_but_never_below_the_request(tmp_path):
    path = _save(Image.fromarray(_halves(600, 800)), tmp_path / "big.jpg")
    rec = read_image(path, policy=ReadPolicy(jpeg_draft_size=(100, 100)))
    assert rec.meta["jpeg_draft_scale"] == 4
    assert "jpeg_draft" in rec.meta["conversions"]
    assert rec.array.shape == (150, 200, 3)
    full = read_image(path)
    assert full.array.shape == (600, 800, 3) and "jpeg_draft_scale" not in full.meta


def test_jpeg_draft_accounts_for_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(_halves(600, 800)), tmp_path / "big.jpg", exif=exif)
    rec = read_image(path, policy=ReadPolicy(jpeg_draft_size=(400, 300)))
    assert rec.meta["jpeg_draft_scale"] == 2
    assert rec.array.shape == (400, 300, 3)  # output is >= (400, 300) after rotation


@pytest.mark.parametrize(
    ("mode", "value", "dtype", "shape", "conversion"),
    [
        ("F", 1.5, np.float32, (3, 4), None),
        ("I", 70000, np.int32, (3, 4), None),
        ("I", 1234, np.uint16, (3, 4), "int32->uint16"),
        ("I;16B", 513, np.uint16, (3, 4), None),
        ("YCbCr", (100, 128, 128), np.uint8, (3, 4, 3), "ycbcr->rgb"),
        ("HSV", (0, 255, 255), np.uint8, (3, 4, 3), "hsv->rgb"),
        ("LAB", (50, 0, 0), np.uint8, (3, 4, 3), "lab->rgb"),
        ("PA", (5, 128), np.uint8, (3, 4, 4), "palette->RGBA"),
    ],
)
def test_mode_rules(mode, value, dtype, shape, conversion):
    conversions: list[str] = []
    array = mode_to_array(Image.new(mode, (4, 3), value), conversions)
    assert array.dtype == dtype
    assert array.shape == shape
    assert conversions == ([conversion] if conversion else [])
    if mode in ("F", "I", "I;16B"):
        assert np.all(array == value)


def test_hsv_red_converts_to_rgb_red():
    array = mode_to_array(Image.new("HSV", (2, 2), (0, 255, 255)), [])
    np.testing.assert_array_equal(array[0, 0], [255, 0, 0])


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_rgb_png_keeps_every_bit(channels):
    """Pillow keeps only the high byte of a 16-bit RGB(A) PNG: a 12-bit chip came out as
    uint8 0..15. The reader joins both bytes: the exact uint16 values, every filter type."""
    from shared_helpers import png16_bytes

    rng = np.random.default_rng(channels)
    for high in (65536, 4096):
        a = rng.integers(0, high, (19, 23, channels)).astype(np.uint16)
        rec = read_image(png16_bytes(a), name="chip.png")
        assert rec.array.dtype == np.uint16 and np.array_equal(rec.array, a)
        assert rec.meta["bits"] == 16


def test_16_bit_rgb_png_falls_back_to_the_high_bytes_where_pillow_differs(monkeypatch):
    """The second pass uses how Pillow describes a PNG's pixel stream (not a public API): on a
    Pillow without it the image still reads, with the high bytes, and says so."""
    from imgtriage.io import _raster
    from shared_helpers import png16_bytes

    monkeypatch.setattr(_raster, "_PNG16_LOW", {k: "no-such-rawmode" for k in _raster._PNG16_LOW})
    a = np.random.default_rng(7).integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    rec = read_image(png16_bytes(a), name="chip.png")
    assert np.array_equal(rec.array, (a >> 8).astype(np.uint8))
    assert "png16_high_bytes_only" in rec.meta["conversions"]
