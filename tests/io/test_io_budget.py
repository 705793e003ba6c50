"""The decode budget: bombs are refused from their headers, with the memory measured here.

Each bomb is small on disk (or sparse) and would cost gigabytes decoded naively; the peak
resident memory of this process while reading it must stay under 1 GB.
"""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
import tifffile
from PIL import Image

from hostile_files import fits_gz_cube, peak_rss_delta, png_bomb, sparse_fits_cube, tiff_of_pages
from imgtriage.errors import ConfigError
from imgtriage.io import Defect, ReadPolicy, try_read_image

GB = 2**30


def _refused(path, issue):
    result, delta = peak_rss_delta(lambda: try_read_image(path))
    assert isinstance(result, Defect), result
    assert result.issue == issue, result
    assert delta < GB, f"reading {path} took {delta / GB:.2f} GB more memory"
    return result


def test_png_under_the_pixel_limit_but_over_the_byte_budget(tmp_path):
    # 10000x10000 16-bit RGBA: exactly at the 1e8 pixel limit, 800 MB decoded, 0.8 MB file.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb())
    defect = _refused(path, "too_large")
    assert "max_decoded_bytes" in defect.message and "--max-decoded-bytes" in defect.message


def test_png_bomb_as_bytes_is_refused_too(tmp_path):
    data = png_bomb(12_000, 8_000, bit_depth=8, color_type=2)
    result, delta = peak_rss_delta(lambda: try_read_image(data, name="upload.png"))
    assert isinstance(result, Defect) and result.issue == "too_large"
    assert delta < GB


def test_a_png_within_budget_still_reads(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(png_bomb(300, 200, bit_depth=16, color_type=6))
    rec = try_read_image(path)
    assert not isinstance(rec, Defect), rec
    assert rec.array.shape == (200, 300, 4)


def test_budget_is_configurable(tmp_path):
    path = tmp_path / "mid.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    tight = ReadPolicy(max_decoded_bytes=100 * 100 * 2)
    assert try_read_image(path, policy=tight).issue == "too_large"
    assert not isinstance(try_read_image(path), Defect)


def test_fits_gz_cube_counts_the_whole_hdu(tmp_path):
    # 300 planes of 1000x1000 float32: 1.2 GB decompressed from a ~1 MB .fits.gz.
    path = tmp_path / "cube.fits.gz"
    path.write_bytes(fits_gz_cube(1000, 1000, 300))
    defect = _refused(path, "too_large")
    assert "HDU 0" in defect.message


def test_fits_gz_cube_is_refused_without_inflating_it(tmp_path, monkeypatch):
    import gzip

    inflated = []
    real_read = gzip.GzipFile.read

    def counting_read(self, *args):
        data = real_read(self, *args)
        inflated.append(len(data))
        return data

    monkeypatch.setattr(gzip.GzipFile, "read", counting_read)
    for in_extension in (False, True):
        inflated.clear()
        data = fits_gz_cube(1000, 1000, 300, in_extension=in_extension)
        defect = try_read_image(data, name="cube.fits.gz")
        assert defect.issue == "too_large" and f"HDU {int(in_extension)}" in defect.message
        assert sum(inflated) < 2**20, f"{sum(inflated)} bytes inflated to refuse it"
    small = try_read_image(fits_gz_cube(30, 20, 2, in_extension=True), name="ok.fits.gz")
    assert small.array.shape == (20, 30) and small.meta["hdu"] == 1


def test_scaled_fits_cube_counts_the_whole_hdu(tmp_path):
    # BSCALE makes astropy scale the whole cube to float: 1.6 GB from a sparse plain file.
    path = sparse_fits_cube(tmp_path / "scaled.fits", 2000, 2000, 100, BSCALE=2.0)
    _refused(path, "too_large")


def test_plain_fits_cube_maps_only_the_kept_plane(tmp_path):
    # Unscaled plain file: memory-mapped, only plane 0 is copied, so it reads.
    path = sparse_fits_cube(tmp_path / "plain.fits", 500, 400, 400)
    rec, delta = peak_rss_delta(lambda: try_read_image(path))
    assert not isinstance(rec, Defect), rec
    assert rec.array.shape == (400, 500) and rec.meta["planes"] == 400
    assert delta < GB
    stacked = try_read_image(path, policy=ReadPolicy(multipage="channels"))
    assert isinstance(stacked, Defect) and stacked.issue == "too_many_pages"


def test_fits_with_too_many_hdus_before_the_image(tmp_path):
    from astropy.io import fits

    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU() for _ in range(6)]
    hdus.append(fits.ImageHDU(np.ones((4, 4), np.float32)))
    path = tmp_path / "many.fits"
    fits.HDUList(hdus).writeto(path)
    assert not isinstance(try_read_image(path), Defect)
    defect = try_read_image(path, policy=ReadPolicy(max_pages=3))
    assert isinstance(defect, Defect) and defect.issue == "too_many_pages"


def test_tiff_of_tiny_pages_reads_only_the_first(tmp_path, monkeypatch):
    # 50,000 1x1 pages: walking tifffile's series over them took minutes.
    path = tmp_path / "pages.tif"
    path.write_bytes(tiff_of_pages(50_000))
    parsed = []
    real_init = tifffile.TiffPage.__init__

    def counting_init(self, *args, **kwargs):
        parsed.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPage, "__init__", counting_init)
    rec = try_read_image(path)
    assert not isinstance(rec, Defect), rec
    assert rec.meta["pages"] == 50_000 and rec.array.shape == (1, 1)
    assert len(parsed) <= 2, f"{len(parsed)} page headers parsed to read page 0"
    stacked = try_read_image(path, policy=ReadPolicy(multipage="channels"))
    assert isinstance(stacked, Defect) and stacked.issue == "too_many_pages"
    assert len(parsed) <= 4


def test_tiff_pages_stacked_count_against_the_byte_budget(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((8, 64, 64), np.uint16))
    policy = ReadPolicy(multipage="channels", max_decoded_bytes=64 * 64 * 2 * 5)
    defect = try_read_image(path, policy=policy)
    assert isinstance(defect, Defect) and defect.issue == "too_large"
    rec = try_read_image(path, policy=ReadPolicy(multipage="channels"))
    assert rec.array.shape == (64, 64, 8)


def test_huge_tiff_page_refused_from_its_ifd(tmp_path):
    # A 20000x20000 float32 page declared in its IFD, data absent: refused before decoding.
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(shape=(20_000, 20_000), dtype=np.float32)
    path = tmp_path / "big.tif"
    path.write_bytes(buf.getvalue()[:4096])
    defect = _refused(path, "too_many_pixels")
    assert "max_pixels" in defect.message
    allowed = ReadPolicy(max_pixels=10**9)
    assert try_read_image(path, policy=allowed).issue == "too_large"


def test_decode_timeout_is_a_defect(tmp_path):
    path = tmp_path / "slow.tif"
    tifffile.imwrite(path, np.zeros((4, 16, 16), np.uint8), photometric="minisblack")
    defect = try_read_image(path, policy=ReadPolicy(decode_timeout_s=1e-9))
    assert isinstance(defect, Defect) and defect.issue == "decode_timeout"
    assert "--decode-timeout" in defect.message
    png = tmp_path / "slow.png"
    Image.new("L", (8, 8)).save(png)
    assert try_read_image(png, policy=ReadPolicy(decode_timeout_s=1e-9)).issue == \
        "decode_timeout"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    out: list = []
    reader = threading.Thread(target=lambda: out.append(try_read_image(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(out[0], Defect) and out[0].issue == "not_regular_file"
    assert "FIFO" in out[0].message


def test_character_device_is_refused(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    defect = try_read_image("/dev/zero")
    assert isinstance(defect, Defect) and defect.issue == "not_regular_file"


@pytest.mark.parametrize("kwargs", [
    {"max_decoded_bytes": 0}, {"max_decoded_bytes": 2**50}, {"max_decoded_bytes": True},
    {"max_pages": 0}, {"max_pages": 10**7}, {"decode_timeout_s": 0},
    {"decode_timeout_s": float("nan")}, {"decode_timeout_s": 1e9}, {"max_pixels": 10**12},
    {"max_pixels": 1.5}, {"nonfinite_fill": float("inf")}, {"jpeg_draft_size": (0, 5)},
])
def test_policy_numbers_are_bounded(kwargs):
    with pytest.raises(ConfigError):
        ReadPolicy(**kwargs)
