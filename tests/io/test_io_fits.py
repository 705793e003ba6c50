"""FITS through astropy: headers, scaling, extensions, compression, cubes and broken files."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from imgtriage.io import ReadPolicy, read_image, try_read_image


def _frame(shape=(30, 40), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(3).normal(1000, 50, shape).astype(dtype)


def _light_header(hdu) -> None:
    hdu.header["EXPTIME"] = (30.0, "seconds")
    hdu.header["IMAGETYP"] = "Light Frame"
    hdu.header["FILTER"] = "Blue"
    hdu.header["XBINNING"] = 2
    hdu.header["COOLED"] = True
    hdu.header.add_history("bias subtracted")
    hdu.header.add_history("flat fielded")
    hdu.header.add_comment("written by the imgtriage tests")


def _write_fits(path: Path, data: np.ndarray) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU(data)
    _light_header(hdu)
    hdu.writeto(path)
    return hdu


def _open_paths() -> set[str]:
    fd_dir = Path("/proc/self/fd")
    paths = set()
    for fd in fd_dir.iterdir():
        try:
            paths.add(os.readlink(fd))
        except OSError:
            continue
    return paths


def test_primary_hdu_with_header_cards(tmp_path):
    data = _frame()
    path = tmp_path / "light.fits"
    _write_fits(path, data)
    rec = read_image(path)
    assert rec.array.dtype == np.float32 and rec.array.shape == (30, 40)
    np.testing.assert_array_equal(rec.array, data)
    header = rec.meta["header"]
    assert header["EXPTIME"] == 30.0
    assert header["IMAGETYP"] == "Light Frame"
    assert header["FILTER"] == "Blue"
    assert header["XBINNING"] == 2 and isinstance(header["XBINNING"], int)
    assert header["COOLED"] is True
    assert header["HISTORY"] == "bias subtracted\nflat fielded"
    assert "" not in header
    assert rec.meta["hdu"] == 0 and rec.meta["format"] == "fits"
    assert rec.meta["bytes"] == path.stat().st_size
    json.dumps(rec.meta)  # the whole record's metadata is JSON-ready


def test_nan_and_inf_are_replaced_and_counted(tmp_path):
    data = _frame()
    data[0, 0], data[1, 1], data[2, 2], data[3, 3] = np.nan, np.inf, -np.inf, np.nan
    path = tmp_path / "hot.fits"
    _write_fits(path, data)
    rec = read_image(path, policy=ReadPolicy(nonfinite_fill=-1.0))
    assert rec.meta["nonfinite"] == 4
    assert np.isfinite(rec.array).all()
    assert rec.array[0, 0] == rec.array[1, 1] == rec.array[2, 2] == -1.0
    assert rec.array[5, 5] == data[5, 5]
    assert read_image(path).array[3, 3] == 0.0  # default fill


def test_bscaled_int16_comes_out_float32_with_the_scale_applied(tmp_path):
    raw = np.arange(-50, 70, dtype=np.int16).reshape(10, 12)
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"] = 0.25
    hdu.header["BZERO"] = 100.0
    path = tmp_path / "scaled.fits"
    hdu.writeto(path)
    rec = read_image(path)
    assert rec.array.dtype == np.float32
    np.testing.assert_allclose(rec.array, raw * 0.25 + 100.0)
    assert rec.meta["header"]["BSCALE"] == 0.25 and rec.meta["header"]["BZERO"] == 100.0


def test_bzero_32768_int16_comes_out_uint16(tmp_path):
    data = np.array([[0, 1, 40000], [65535, 32768, 7]], dtype=np.uint16)
    path = tmp_path / "camera.fits"
    fits.PrimaryHDU(data).writeto(path)  # stored as int16 with BZERO = 32768
    rec = read_image(path)
    assert rec.array.dtype == np.uint16
    np.testing.assert_array_equal(rec.array, data)


def test_image_in_extension_with_empty_primary(tmp_path):
    data = _frame((16, 24))
    primary = fits.PrimaryHDU()
    primary.header["TELESCOP"] = "T80"
    image = fits.ImageHDU(data, name="SCI")
    image.header["GAIN"] = 1.6
    path = tmp_path / "mef.fits"
    fits.HDUList([primary, image]).writeto(path)
    rec = read_image(path)
    assert rec.meta["hdu"] == 1
    assert rec.meta["header"]["GAIN"] == 1.6 and rec.meta["header"]["EXTNAME"] == "SCI"
    assert rec.meta["primary_header"]["TELESCOP"] == "T80"
    np.testing.assert_array_equal(rec.array, data)


def test_tile_compressed_hdu(tmp_path):
    data = np.random.default_rng(5).integers(0, 4000, (64, 48)).astype(np.int32)
    comp = fits.CompImageHDU(data, compression_type="RICE_1")
    comp.header["FILTER"] = "R"
    path = tmp_path / "frame.fz"
    fits.HDUList([fits.PrimaryHDU(), comp]).writeto(path)
    rec = read_image(path)
    assert rec.meta["hdu"] == 1 and rec.meta["hdu_type"] == "CompImageHDU"
    assert rec.meta["header"]["FILTER"] == "R"
    assert rec.array.dtype == np.int32
    np.testing.assert_array_equal(rec.array, data)


@pytest.mark.parametrize(
    ("suffix", "compress"), [(".fits.gz", gzip.compress), (".fits.bz2", bz2.compress)]
)
def test_compressed_fits_files_and_bytes(tmp_path, suffix, compress):
    data = _frame((12, 14))
    plain = tmp_path / "plain.fits"
    _write_fits(plain, data)
    packed = tmp_path / f"frame{suffix}"
    packed.write_bytes(compress(plain.read_bytes()))
    rec = read_image(packed)
    np.testing.assert_array_equal(rec.array, data)
    assert rec.meta["compression"] == ("gzip" if suffix.endswith("gz") else "bzip2")
    assert rec.meta["header"]["EXPTIME"] == 30.0
    from_bytes = read_image(packed.read_bytes(), name=f"upload{suffix}")
    np.testing.assert_array_equal(from_bytes.array, data)


def test_astropy_written_fits_gz(tmp_path):
    data = _frame((12, 14))
    path = tmp_path / "frame.fits.gz"
    fits.PrimaryHDU(data).writeto(path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_image(path).array, data)


def test_cube_follows_the_multipage_policy(tmp_path):
    cube = _frame((3, 10, 12))
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(cube).writeto(path)
    first = read_image(path, policy=ReadPolicy(multipage="first"))
    assert first.array.shape == (10, 12)
    np.testing.assert_array_equal(first.array, cube[0])
    assert "first_plane_of_3" in first.meta["conversions"] and first.meta["planes"] == 3
    stacked = read_image(path, policy=ReadPolicy(multipage="channels"))
    assert stacked.array.shape == (10, 12, 3)
    np.testing.assert_array_equal(stacked.array, np.moveaxis(cube, 0, -1))


def _strip_end_card(data: bytes, keep_padding: bool) -> bytes:
    """Blank out the primary END card, or drop it with the header padding after it."""
    end = next(i for i in range(0, len(data), 80) if data[i : i + 8] == b"END     ")
    if keep_padding:
        return data[:end] + b" " * 80 + data[end + 80 :]
    return data[:end] + data[2880 * (end // 2880 + 1) :]


@pytest.mark.parametrize("keep_padding", [True, False])
def test_missing_end_card_still_reads(tmp_path, keep_padding):
    data = _frame((20, 20))
    good = tmp_path / "good.fits"
    _write_fits(good, data)
    path = tmp_path / "noend.fits"
    path.write_bytes(_strip_end_card(good.read_bytes(), keep_padding))
    rec = read_image(path)
    assert "fits_end_card_restored" in rec.meta["conversions"]
    assert rec.meta["header"]["EXPTIME"] == 30.0
    np.testing.assert_array_equal(rec.array, data)


def test_trailing_extension_without_end_card(tmp_path):
    """astropy itself refuses this file unless ignore_missing_end is set."""
    data = _frame((8, 8))
    good = tmp_path / "good.fits"
    _write_fits(good, data)
    tail = fits.ImageHDU().header.tostring(endcard=False, padding=False).encode()
    tail += b" " * (-len(tail) % 2880)  # a whole block of cards, none of them END
    path = tmp_path / "tail.fits"
    path.write_bytes(good.read_bytes() + tail)
    with pytest.raises(OSError, match="END"), fits.open(path) as hdul:
        hdul.readall()
    np.testing.assert_array_equal(read_image(path).array, data)


def test_table_only_fits_has_no_image_data(tmp_path, assert_defect):
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=np.ones(3))])
    path = tmp_path / "catalog.fits"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    defect = assert_defect(try_read_image(path), "no_image_data", str(path))
    assert "BinTableHDU" in defect.message


def test_truncated_fits(tmp_path, assert_defect):
    good = tmp_path / "good.fits"
    _write_fits(good, _frame((100, 100)))
    path = tmp_path / "cut.fits"
    path.write_bytes(good.read_bytes()[:20000])  # the header and 42 of 100 float32 rows
    assert_defect(try_read_image(path), "truncated", str(path))  # under half: a defect


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int16])
def test_truncated_fits_with_most_rows_reads_partially_flagged(tmp_path, dtype):
    """Issue 19: the rows that exist are read (scaled as astropy scales them), the missing
    ones filled with nonfinite_fill, and the record says how many were read."""
    data = (_frame((100, 80)) - (900 if dtype == np.int16 else 0)).astype(dtype)
    good = tmp_path / "good.fits"
    hdu = _write_fits(good, data)
    full = read_image(good).array
    start = len(hdu.header.tostring())  # the data follows the header's blocks
    row = 80 * data.dtype.itemsize
    cut = tmp_path / "cut.fits"
    cut.write_bytes(good.read_bytes()[:start + 70 * row + row // 2])  # 70.5 rows
    rec = read_image(cut, policy=ReadPolicy(nonfinite_fill=-1.0))
    assert rec.meta["partial"] == {"rows_read": 70, "rows": 100, "fraction": 0.7}
    assert rec.array.shape == full.shape and rec.array.dtype == full.dtype
    np.testing.assert_array_equal(rec.array[:70], full[:70])
    assert (rec.array[70:] == (-1.0 if full.dtype.kind == "f" else 0)).all()
    assert rec.meta["header"]["EXPTIME"] == 30.0
    assert any(c.startswith("fits_partial_70_of_100") for c in rec.meta["conversions"])
    off = ReadPolicy(fits_partial_min=1.0)
    assert try_read_image(cut, policy=off).issue == "truncated"
    gz = tmp_path / "cut.fits.gz"
    gz.write_bytes(gzip.compress(good.read_bytes())[:-2000])  # a cut compressed stream
    out = read_image(gz)  # what the stream holds before the cut: partial, the same pixels
    n = out.meta["partial"]["rows_read"]
    assert 50 <= n < 100 and out.meta["compression"] == "gzip"
    np.testing.assert_array_equal(out.array[:n], full[:n])


def test_oversized_fits_is_refused_from_naxis(tmp_path, assert_defect):
    header = fits.Header([("SIMPLE", True), ("BITPIX", 8), ("NAXIS", 2)])
    header["NAXIS1"], header["NAXIS2"] = 100_000, 100_000  # 10 GB claimed, none present
    path = tmp_path / "bomb.fits"
    path.write_bytes(header.tostring().encode())
    defect = assert_defect(try_read_image(path), "too_many_pixels", str(path))
    assert "100000x100000" in defect.message


def test_fits_reader_closes_the_file_and_copies_the_data(tmp_path):
    path = tmp_path / "closed.fits"
    _write_fits(path, _frame((64, 64)))
    rec = read_image(path)
    if Path("/proc/self/fd").is_dir():
        assert str(path) not in _open_paths()
    assert rec.array.flags.owndata and rec.array.flags.writeable
    assert not isinstance(rec.array, np.memmap)
    path.unlink()  # the array must stay usable without its file
    assert float(rec.array.sum()) > 0


def test_fits_bytes_equal_fits_file(tmp_path):
    path = tmp_path / "frame.fits"
    _write_fits(path, _frame())
    from_file = read_image(path)
    from_bytes = read_image(path.read_bytes(), name="upload.fits")
    np.testing.assert_array_equal(from_bytes.array, from_file.array)
    assert from_bytes.meta["header"] == from_file.meta["header"]


def test_astropy_warnings_do_not_leak(tmp_path):
    good = tmp_path / "good.fits"
    _write_fits(good, _frame((20, 20)))
    noend = tmp_path / "noend.fits"
    noend.write_bytes(_strip_end_card(good.read_bytes(), keep_padding=True))
    cut = tmp_path / "cut.fits"
    cut.write_bytes(good.read_bytes()[:3000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_image(noend)
        try_read_image(cut)
    assert caught == []


def test_header_values_are_json_types(tmp_path):
    hdu = fits.PrimaryHDU(_frame((4, 4)))
    hdu.header["UNDEF"] = None  # an undefined value card
    hdu.header["CPLX"] = complex(1, 2)
    hdu.header["HIERARCH ESO DET NAME"] = "ccd"
    path = tmp_path / "odd.fits"
    hdu.writeto(path)
    header = read_image(path).meta["header"]
    assert header["UNDEF"] is None
    assert isinstance(header["CPLX"], str)
    assert header["ESO DET NAME"] == "ccd"
    json.dumps(header)


def test_fits_from_bytes_object(tmp_path):
    buf = io.BytesIO()
    fits.PrimaryHDU(np.full((5, 6), 3, np.int16)).writeto(buf)
    rec = read_image(buf.getvalue(), name="flat.fits")
    assert rec.meta["degenerate"] is True
    assert rec.array.dtype == np.int16 and rec.array.shape == (5, 6)


def test_non_ascii_header_byte_is_tolerated(tmp_path):
    hdu = fits.PrimaryHDU(_frame((4, 5)))
    hdu.header["OBSERVER"] = "Jose X"
    buf = io.BytesIO()
    hdu.writeto(buf)
    data = bytearray(buf.getvalue())
    data[data.find(b"Jose X") + 3] = 0xE9  # a latin-1 e-acute, as some software writes it
    rec = read_image(bytes(data), name="latin1.fits")
    assert rec.meta["header"]["OBSERVER"].startswith("Jos")
    assert "fits_end_card_restored" not in rec.meta["conversions"]


def test_fits_planes_stacked_as_channels_are_bands_not_alpha(tmp_path):
    fits.PrimaryHDU(np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)).writeto(
        tmp_path / "cube.fits")
    rec = read_image(tmp_path / "cube.fits", policy=ReadPolicy(multipage="channels"))
    assert rec.array.shape == (6, 5, 4) and rec.meta["alpha"] is False
