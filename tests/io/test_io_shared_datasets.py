"""Real files from ../shared/datasets (skipped when the folder is absent)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from imgtriage.io import Defect, is_supported_path, read_image, try_read_image

pytestmark = pytest.mark.shared

# Files of fits-samples known to hold no image at all (none, today: each has one).
NO_IMAGE_FITS: set[str] = set()


def test_every_fits_sample_reads(shared_dataset):
    folder = shared_dataset("fits-samples")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert files, f"{folder} is empty"
    for path in files:
        assert is_supported_path(path), path
        result = try_read_image(path)
        if path.name in NO_IMAGE_FITS:
            assert isinstance(result, Defect) and result.issue == "no_image_data", path
            continue
        assert not isinstance(result, Defect), result
        meta = result.meta
        assert meta["format"] == "fits" and meta["header"], path
        assert result.array.ndim == 2 and min(result.array.shape) > 1, path
        assert meta["shape"] == [meta["header"]["NAXIS2"], meta["header"]["NAXIS1"]]
        assert np.isfinite(result.array).all() if result.array.dtype.kind == "f" else True
        json.dumps(meta)


def test_fits_samples_known_properties(shared_dataset):
    folder = shared_dataset("fits-samples")
    m13 = read_image(folder / "M13_blue_0001.fits")
    assert m13.array.dtype == np.uint16  # int16 with BZERO = 32768
    assert m13.array.shape == (1040, 1392)
    horse = read_image(folder / "HorseHead.fits")  # image primary followed by a table
    assert horse.meta["hdu"] == 0 and horse.array.dtype == np.int16
    sdss = read_image(folder / "reprojected_sdss_g.fits.bz2")
    assert sdss.meta["compression"] == "bzip2" and sdss.array.dtype == np.float32
    spitzer = read_image(folder / "spitzer_example_image.fits")
    assert spitzer.meta["nonfinite"] > 0  # it has NaN pixels, replaced and counted
    scaled = read_image(folder / "gc_2mass_k.fits")
    assert scaled.array.dtype == np.float32  # BSCALE'd int16


def test_sirst_infrared_pngs_in_mixed_modes(shared_dataset):
    folder = shared_dataset("sirst-infrared")
    files = sorted(folder.glob("*.png"))  # all of them (~1 s): the rare modes are few
    assert files
    modes = Counter()
    for path in files:
        rec = read_image(path)
        modes[rec.meta["mode"]] += 1
        expected_channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}.get(rec.meta["mode"])
        if expected_channels is not None:
            assert rec.meta["channels"] == expected_channels, path
        assert rec.array.dtype in (np.uint8, np.uint16), path
        assert rec.array.shape[0] > 16 and rec.array.shape[1] > 16
    assert sum(modes.values()) == len(files)
    assert len(modes) >= 2, f"expected mixed PNG modes, got {dict(modes)}"


def test_mstar_sar_jpegs(shared_dataset):
    folder = shared_dataset("mstar-soc10")
    files = sorted(folder.glob("train/*/*.jpeg"))[:3] + sorted(folder.glob("test/*/*.jpeg"))[:3]
    assert files
    for path in files:
        rec = read_image(path)
        assert rec.meta["format"] == "jpeg"
        assert rec.array.shape[:2] == (128, 128), path
        assert rec.array.dtype == np.uint8
        assert not rec.meta["degenerate"]
