"""TIFF through tifffile: dtypes, samples, planar layouts and multi-page policies."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from imgtriage.io import ReadPolicy, read_image, try_read_image


def _rng() -> np.random.Generator:
    return np.random.default_rng(11)


def _random(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return _rng().normal(0, 100, shape).astype(dtype)
    info = np.iinfo(dtype)
    return _rng().integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_single_channel_round_trip_keeps_dtype_and_values(tmp_path, dtype):
    pixels = _random((13, 21), dtype)
    path = tmp_path / "frame.tif"
    tifffile.imwrite(path, pixels, description="flat field 3")
    rec = read_image(path)
    assert rec.array.dtype == dtype
    np.testing.assert_array_equal(rec.array, pixels)
    meta = rec.meta
    assert meta["format"] == "tiff" and meta["pages"] == 1
    assert meta["photometric"] == "minisblack"
    assert meta["description"] == "flat field 3"
    assert meta["channels"] == 1 and meta["shape"] == [13, 21]
    assert meta["bytes"] == path.stat().st_size


def test_big_endian_tiff_comes_out_native(tmp_path):
    pixels = _random((8, 9), np.uint16)
    tifffile.imwrite(tmp_path / "be.tif", pixels, byteorder=">")
    rec = read_image(tmp_path / "be.tif")
    assert rec.array.dtype.isnative
    np.testing.assert_array_equal(rec.array, pixels)


def test_rgb_tiff(tmp_path):
    pixels = _random((10, 12, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", pixels, photometric="rgb")
    rec = read_image(tmp_path / "rgb.tiff")
    assert rec.meta["photometric"] == "rgb" and rec.meta["channels"] == 3
    np.testing.assert_array_equal(rec.array, pixels)


def test_five_sample_contiguous_tiff(tmp_path):
    pixels = _random((10, 12, 5), np.uint16)
    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig")
    rec = read_image(path)
    assert rec.array.shape == (10, 12, 5)
    assert rec.meta["axes"] == "YXS"
    np.testing.assert_array_equal(rec.array, pixels)


def test_five_sample_planar_tiff_moves_channels_last(tmp_path):
    planes = _random((5, 10, 12), np.float32)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, planes, photometric="minisblack", planarconfig="separate")
    rec = read_image(path)
    assert rec.meta["planarconfig"] == "separate"
    assert "planar->interleaved" in rec.meta["conversions"]
    assert rec.array.shape == (10, 12, 5)
    np.testing.assert_array_equal(rec.array, np.moveaxis(planes, 0, -1))


def _write_pages(path, pages) -> None:
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            tif.write(page, photometric="minisblack")


def test_multipage_first_policy_keeps_page_zero(tmp_path):
    pages = [_random((8, 9), np.uint16) for _ in range(3)]
    _write_pages(tmp_path / "stack.tif", pages)
    rec = read_image(tmp_path / "stack.tif", policy=ReadPolicy(multipage="first"))
    assert rec.meta["pages"] == 3
    assert "first_page_of_3" in rec.meta["conversions"]
    np.testing.assert_array_equal(rec.array, pages[0])


def test_multipage_channels_policy_stacks_pages(tmp_path):
    pages = [_random((8, 9), np.uint16) for _ in range(3)]
    _write_pages(tmp_path / "stack.tif", pages)
    rec = read_image(tmp_path / "stack.tif", policy=ReadPolicy(multipage="channels"))
    assert rec.array.shape == (8, 9, 3)
    np.testing.assert_array_equal(rec.array, np.stack(pages, axis=-1))


def test_multipage_channels_needs_one_page_shape(tmp_path, assert_defect):
    path = tmp_path / "mixed.tif"
    _write_pages(path, [_random((8, 9), np.uint8), _random((4, 9), np.uint8)])
    result = try_read_image(path, policy=ReadPolicy(multipage="channels"))
    defect = assert_defect(result, "bad_shape", str(path))
    assert "page 1" in defect.message
    assert read_image(path).array.shape == (8, 9)  # "first" still reads it


def test_bilevel_miniswhite_tiff_is_inverted_to_0_255(tmp_path):
    bits = _rng().integers(0, 2, (6, 16)).astype(bool)
    path = tmp_path / "fax.tif"
    tifffile.imwrite(path, bits, photometric="miniswhite")
    rec = read_image(path)
    assert "miniswhite->minisblack" in rec.meta["conversions"]
    assert rec.array.dtype == np.uint8
    np.testing.assert_array_equal(rec.array, np.where(bits, 0, 255))


def test_truncated_tiff_is_refused_from_its_ifd(tmp_path, assert_defect):
    buf = io.BytesIO()
    tifffile.imwrite(buf, _random((64, 64), np.uint16))
    path = tmp_path / "cut.tif"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert_defect(try_read_image(path), "truncated", str(path))


def test_oversized_tiff_page_is_refused_before_decoding(tmp_path, monkeypatch, assert_defect):
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, _random((20, 20), np.uint8))

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels must not be decoded for an oversized page")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    result = try_read_image(path, policy=ReadPolicy(max_pixels=100))
    defect = assert_defect(result, "too_many_pixels", str(path))
    assert "20x20" in defect.message


def test_tiff_bytes_equal_tiff_file(tmp_path):
    pixels = _random((7, 5, 3), np.uint8)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, pixels)
    from_bytes = read_image(path.read_bytes(), name="upload.tif")
    from_file = read_image(path)
    np.testing.assert_array_equal(from_bytes.array, from_file.array)
    assert from_bytes.meta == from_file.meta


@pytest.mark.parametrize("compression", ["tiff_lzw", "packbits", "tiff_adobe_deflate"])
def test_compressed_tiffs_written_by_pillow(tmp_path, compression):
    """LZW needs imagecodecs in tifffile; without it the reader falls back to Pillow."""
    from PIL import Image

    pixels = _random((16, 20, 3), np.uint8)
    path = tmp_path / "scan.tif"
    Image.fromarray(pixels).save(path, compression=compression)
    rec = read_image(path)
    np.testing.assert_array_equal(rec.array, pixels)
    used_pillow = any(c.startswith("pillow_decoder") for c in rec.meta["conversions"])
    assert used_pillow == (compression == "tiff_lzw" and not _has_imagecodecs())


def test_lzw_multipage_channels(tmp_path):
    from PIL import Image

    planes = [_random((6, 7), np.uint16) for _ in range(3)]
    path = tmp_path / "stack.tif"
    frames = [Image.fromarray(p) for p in planes]
    frames[0].save(path, save_all=True, append_images=frames[1:], compression="tiff_lzw")
    rec = read_image(path, policy=ReadPolicy(multipage="channels"))
    assert rec.array.dtype == np.uint16
    np.testing.assert_array_equal(rec.array, np.stack(planes, axis=-1))


def _has_imagecodecs() -> bool:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


def test_palette_tiff_becomes_rgb(tmp_path):
    indices = _random((5, 6), np.uint8)
    colormap = np.stack([np.arange(256) * 257, (255 - np.arange(256)) * 257, np.zeros(256)])
    path = tmp_path / "pal.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap.astype(np.uint16))
    rec = read_image(path)
    assert "palette->RGB" in rec.meta["conversions"]
    assert rec.array.shape == (5, 6, 3)
    np.testing.assert_array_equal(rec.array[..., 0], indices.astype(np.uint16) * 257)


def test_cmyk_tiff_becomes_rgb(tmp_path):
    cmyk = np.zeros((4, 5, 4), np.uint8)
    cmyk[..., 1:3] = 255  # magenta + yellow = red
    path = tmp_path / "print.tif"
    tifffile.imwrite(path, cmyk, photometric="separated")
    rec = read_image(path)
    assert "cmyk->rgb" in rec.meta["conversions"]
    np.testing.assert_array_equal(rec.array[0, 0], [255, 0, 0])


@pytest.mark.parametrize("how, alpha", [
    ({"photometric": "minisblack", "planarconfig": "separate"}, False),  # 4 planar bands
    ({"photometric": "rgb", "extrasamples": ["unspecified"]}, False),     # RGB + NIR
    ({"photometric": "rgb", "extrasamples": ["unassalpha"]}, True),       # RGBA
])
def test_a_fourth_sample_is_alpha_only_where_extrasamples_says_so(tmp_path, how, alpha):
    bands = _random((4, 6, 5) if how.get("planarconfig") else (6, 5, 4), np.uint16)
    tifffile.imwrite(tmp_path / "chip.tif", bands, **how)
    rec = read_image(tmp_path / "chip.tif")
    assert rec.array.shape == (6, 5, 4) and rec.meta["alpha"] is alpha


def test_a_complex_sar_tiff_becomes_its_amplitude(tmp_path):
    rng = _rng()
    slc = (rng.normal(size=(6, 5)) + 1j * rng.normal(size=(6, 5))).astype(np.complex64)
    tifffile.imwrite(tmp_path / "slc.tif", slc)
    rec = read_image(tmp_path / "slc.tif")
    assert rec.array.dtype == np.float32 and "complex->amplitude" in rec.meta["conversions"]
    np.testing.assert_allclose(rec.array, np.abs(slc), rtol=1e-6)  # not the real part alone
