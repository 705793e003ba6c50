"""Every way a file can be refused comes back as the right typed Defect, naming the file."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image, ImageFile

from imgtriage.errors import DataError, ImageReadError
from imgtriage.io import DEFECT_ISSUES, Defect, ReadPolicy, read_image, try_read_image


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _noise(shape=(64, 64, 3)) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bilevel_png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height that is tiny on disk (all-zero rows compress well)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    row = b"\x00" + bytes((width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_empty_file(tmp_path, assert_defect):
    path = _write(tmp_path / "empty.png", b"")
    assert_defect(try_read_image(path), "empty_file", str(path))
    assert_defect(try_read_image(b"", name="upload.png"), "empty_file", "upload.png")


def test_text_named_png_is_a_format_mismatch(tmp_path, assert_defect):
    path = _write(tmp_path / "notes.png", b"these are my notes, not a picture\n")
    defect = assert_defect(try_read_image(path), "format_mismatch", str(path))
    assert "PNG" in defect.message


def test_text_with_an_unsupported_name_is_unsupported(tmp_path, assert_defect):
    path = _write(tmp_path / "notes.txt", b"plain text\n")
    assert_defect(try_read_image(path), "unsupported_format", str(path))
    assert_defect(try_read_image(b"%PDF-1.7 ..."), "unsupported_format", "<bytes>")


def test_png_named_jpg_is_refused_with_a_rename_hint(tmp_path, assert_defect):
    path = _write(tmp_path / "cat.jpg", _png_bytes(_noise()))
    defect = assert_defect(try_read_image(path), "format_mismatch", str(path))
    assert "PNG" in defect.message and "JPEG" in defect.message
    assert ".jpg" in defect.message and "rename" in defect.message and ".png" in defect.message


def test_fits_named_tif_is_a_format_mismatch(tmp_path, assert_defect):
    buf = io.BytesIO()
    fits.PrimaryHDU(np.zeros((4, 4), np.float32)).writeto(buf)
    path = _write(tmp_path / "frame.tif", buf.getvalue())
    defect = assert_defect(try_read_image(path), "format_mismatch", str(path))
    assert "FITS" in defect.message and "TIFF" in defect.message


def test_gzip_that_is_not_fits(tmp_path, assert_defect):
    path = _write(tmp_path / "frame.fits.gz", gzip.compress(b"a text file, gzipped" * 10))
    assert_defect(try_read_image(path), "format_mismatch", str(path))
    other = _write(tmp_path / "logs.gz", gzip.compress(b"log line\n"))
    assert_defect(try_read_image(other), "unsupported_format", str(other))


def test_bytes_decide_when_the_name_has_no_image_extension(tmp_path):
    pixels = _noise((5, 6, 3))
    rec = read_image(_write(tmp_path / "capture.dat", _png_bytes(pixels)))
    assert rec.meta["format"] == "png"
    np.testing.assert_array_equal(rec.array, pixels)
    np.testing.assert_array_equal(read_image(_png_bytes(pixels)).array, pixels)


@pytest.mark.parametrize("encode", [_png_bytes, _jpeg_bytes], ids=["png", "jpeg"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_photos(tmp_path, assert_defect, encode, keep):
    data = encode(_noise())
    suffix = ".png" if encode is _png_bytes else ".jpg"
    path = _write(tmp_path / f"cut{suffix}", data[: int(len(data) * keep)])
    assert_defect(try_read_image(path), "truncated", str(path))


def test_png_cut_inside_its_header_is_truncated(tmp_path, assert_defect):
    path = _write(tmp_path / "stub.png", _png_bytes(_noise())[:40])
    assert_defect(try_read_image(path), "truncated", str(path))


def test_truncation_does_not_leak_into_pillow_globals(tmp_path):
    path = _write(tmp_path / "cut.png", _png_bytes(_noise())[:3000])
    try_read_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_is_a_decode_error_with_the_decoder_message(tmp_path, assert_defect):
    data = bytearray(_png_bytes(_noise()))
    data[41:45] = b"\xff" * 4  # a broken zlib header inside IDAT; the file still ends with IEND
    path = _write(tmp_path / "corrupt.png", bytes(data))
    defect = assert_defect(try_read_image(path), "decode_error", str(path))
    assert "PNG" in defect.message


def test_decompression_bomb_png_is_refused_without_decoding(tmp_path, assert_defect):
    path = _write(tmp_path / "bomb.png", _bilevel_png_bomb(20_000, 20_000))
    assert path.stat().st_size < 200_000
    defect = assert_defect(try_read_image(path, policy=ReadPolicy(max_pixels=10**10)),
                           "too_many_pixels", str(path))
    assert "holds whatever --max-pixels says" in defect.message  # raising it would not help


def test_policy_pixel_limit_is_checked_before_load(tmp_path, monkeypatch, assert_defect):
    path = _write(tmp_path / "small.png", _png_bytes(_noise((20, 20, 3))))

    def no_decoding(self):
        raise AssertionError("pixels must not be decoded when the header is over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    result = try_read_image(path, policy=ReadPolicy(max_pixels=100))
    defect = assert_defect(result, "too_many_pixels", str(path))
    assert "20x20" in defect.message and "--max-pixels" in defect.message


def test_missing_path_and_directory_are_not_found(tmp_path, assert_defect):
    missing = tmp_path / "nope.png"
    defect = assert_defect(try_read_image(missing), "not_found", str(missing))
    assert "does not exist" in defect.message
    defect = assert_defect(try_read_image(tmp_path), "not_found", str(tmp_path))
    assert "directory" in defect.message
    (tmp_path / "dangling.png").symlink_to(missing)
    defect = assert_defect(try_read_image(tmp_path / "dangling.png"), "not_found",
                           str(tmp_path / "dangling.png"))
    assert f"is a link to '{missing}', which does not exist" in defect.message


def test_permission_denied_when_open_fails(tmp_path, monkeypatch, assert_defect):
    path = _write(tmp_path / "locked.png", _png_bytes(_noise()))
    real_open = os.open

    def guarded_open(target, *args, **kwargs):
        if Path(target) == path:
            raise PermissionError(13, "Permission denied", str(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    assert_defect(try_read_image(path), "permission_denied", str(path))
    assert_defect(try_read_image(str(path)), "permission_denied", str(path))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_permission_denied_on_a_real_chmod_000_file(tmp_path, assert_defect):
    path = _write(tmp_path / "locked.png", _png_bytes(_noise()))
    path.chmod(0)
    try:
        assert_defect(try_read_image(path), "permission_denied", str(path))
    finally:
        path.chmod(0o644)


def test_read_image_raises_image_read_error_carrying_the_defect(tmp_path):
    path = _write(tmp_path / "empty.tif", b"")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert isinstance(info.value, DataError)
    assert info.value.defect == Defect(str(path), "empty_file", info.value.defect.message)
    assert str(path) in str(info.value) and "empty_file" in str(info.value)


def test_unexpected_decoder_exceptions_become_decode_errors(tmp_path, monkeypatch, assert_defect):
    import imgtriage.io._raster as raster

    def explode(img, conversions):
        raise RuntimeError("codec exploded")

    monkeypatch.setattr(raster, "mode_to_array", explode)
    path = _write(tmp_path / "ok.png", _png_bytes(_noise()))
    defect = assert_defect(try_read_image(path), "decode_error", str(path))
    assert "codec exploded" in defect.message


def test_a_non_path_argument_is_a_type_error():
    with pytest.raises(TypeError, match="path or bytes"):
        try_read_image(12345)  # type: ignore[arg-type]


def test_every_defect_issue_is_documented():
    assert set(DEFECT_ISSUES) >= {
        "not_found", "permission_denied", "empty_file", "truncated", "format_mismatch",
        "unsupported_format", "too_many_pixels", "no_image_data", "decode_error", "bad_shape",
    }  # fmt: skip


def test_png_bytes_equal_reading_the_file(tmp_path):
    data = _png_bytes(_noise((9, 7, 3)))
    path = _write(tmp_path / "upload.png", data)
    from_bytes = read_image(data, name="upload.png")
    from_file = read_image(path)
    np.testing.assert_array_equal(from_bytes.array, from_file.array)
    assert from_bytes.meta == from_file.meta


def test_bytes_defects_use_the_given_name(assert_defect):
    assert_defect(try_read_image(b"not an image", name="u/cat.png"), "format_mismatch", "u/cat.png")


@pytest.mark.parametrize(
    ("pixels", "degenerate"),
    [
        (np.full((8, 8), 17, np.uint8), True),
        (np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1)), True),  # solid red
        (np.eye(8, dtype=np.uint8) * 255, False),
        (np.dstack([np.full((8, 8), 5, np.uint8)] * 2 + [np.eye(8, dtype=np.uint8)]), False),
    ],
)
def test_constant_images_are_flagged_degenerate(tmp_path, pixels, degenerate):
    rec = read_image(_write(tmp_path / "c.png", _png_bytes(pixels)))
    assert rec.meta["degenerate"] is degenerate
