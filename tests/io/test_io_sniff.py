"""Format detection from magic bytes and the supported-extension rules."""

from __future__ import annotations

import bz2
import gzip
import io

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from PIL import Image

from imgtriage.io import SUPPORTED_EXTENSIONS, is_supported_path, sniff_format


def _pil_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, fmt)
    return buf.getvalue()


def _tiff_bytes(byteorder: str = "<", bigtiff: bool = False) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((4, 4), np.uint8), byteorder=byteorder, bigtiff=bigtiff)
    return buf.getvalue()


def _fits_bytes() -> bytes:
    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _pil_bytes("JPEG"), "jpeg"),
        (lambda: _pil_bytes("PNG"), "png"),
        (lambda: _pil_bytes("BMP"), "bmp"),
        (lambda: _pil_bytes("WEBP"), "webp"),
        (lambda: _pil_bytes("GIF"), "gif"),
        (lambda: _tiff_bytes("<"), "tiff"),
        (lambda: _tiff_bytes(">"), "tiff"),
        (lambda: _tiff_bytes(bigtiff=True), "tiff"),
        (_fits_bytes, "fits"),
        (lambda: gzip.compress(_fits_bytes()), "gzip"),
        (lambda: bz2.compress(_fits_bytes()), "bzip2"),
    ],
)
def test_sniff_format_recognises_real_file_headers(make, expected):
    data = make()
    assert sniff_format(data[:64]) == expected
    assert sniff_format(data) == expected  # longer input is fine too


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"hello, world\n",
        b"BM",
        b"BMxxxxxxxxxxxxxxxxxx",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"%PDF-1.7",
    ],
)
def test_sniff_format_returns_none_for_other_bytes(head):
    assert sniff_format(head) is None


def test_supported_extensions_are_exactly_the_documented_set():
    assert {
        ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
        ".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.bz2", ".fz",
    } == SUPPORTED_EXTENSIONS  # fmt: skip
    assert all(ext == ext.lower() and ext.startswith(".") for ext in SUPPORTED_EXTENSIONS)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a/b/photo.JPG", True),
        ("frame.fits.gz", True),
        ("frame.FIT.GZ", True),
        ("survey.v2.fits.bz2", True),
        ("tile.fz", True),
        ("scan.tiff", True),
        ("archive.tar.gz", False),
        ("notes.gz", False),
        ("notes.txt", False),
        ("README", False),
        ("image.png.bak", False),
    ],
)
def test_is_supported_path_handles_double_extensions(path, expected, tmp_path):
    assert is_supported_path(path) is expected
    assert is_supported_path(tmp_path / path) is expected
