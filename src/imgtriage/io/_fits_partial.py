"""A FITS file cut short inside its pixel data: read the rows that are there.

Acquisition software that crashes mid-write, or a copy that stopped early, leaves a file whose
header is whole but whose data ends early. astropy refuses such a file; the pipelines our
observatory users came from read what is there. Here, when the first image HDU's header is
complete and at least ``ReadPolicy.fits_partial_min`` of its first plane's rows are present,
those rows are decoded (BITPIX, BSCALE/BZERO/BLANK as astropy applies them), the missing rows
are filled with ``ReadPolicy.nonfinite_fill``, and the metadata says so:
``meta["partial"] = {"rows_read", "rows", "fraction"}`` and a ``fits_partial_...`` conversion.
Predictions carry ``"flags": ["partial"]``. Below the share, or for tile-compressed HDUs
(a binary table: no row of pixels can be trusted), the file stays a ``truncated`` defect.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgtriage.io._fits_header import BLOCK, CARD, header_dict
from imgtriage.io._source import Source
from imgtriage.io._types import ReadPolicy

_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_MAX_HDUS = 16


def _header_end(raw: bytes, start: int) -> int | None:
    """Offset just after the block holding the END card of the header at ``start``."""
    for pos in range(start, len(raw) - CARD + 1, CARD):
        if raw[pos:pos + 3] == b"END" and raw[pos + 3:pos + CARD].strip() == b"":
            return start + math.ceil((pos + CARD - start) / BLOCK) * BLOCK
    return None


def _data_bytes(header: Any) -> int:
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    dims = [int(header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)]
    count = int(header.get("GCOUNT", 1)) * (int(header.get("PCOUNT", 0)) + math.prod(dims))
    return abs(int(header["BITPIX"])) // 8 * count


def _image_header(raw: bytes) -> tuple[Any, int, int] | None:
    """(header, data offset, HDU index) of the first image HDU whose header is whole."""
    from astropy.io import fits

    pos = 0
    for index in range(_MAX_HDUS):
        end = _header_end(raw, pos)
        if end is None:
            return None
        try:
            header = fits.Header.fromstring(raw[pos:end].decode("ascii", "replace"))
        except Exception:  # a header astropy cannot parse: nothing to salvage
            return None
        naxis = int(header.get("NAXIS", 0))
        if naxis >= 2 and not header.get("ZIMAGE") and header.get("XTENSION", "IMAGE") in (
                "IMAGE", "IMAGE   ") and all(int(header.get(f"NAXIS{k}", 0)) > 0
                                             for k in (1, 2)):
            return header, end, index
        pos = end + math.ceil(_data_bytes(header) / BLOCK) * BLOCK
        if pos >= len(raw):
            return None
    return None


def _scaled(rows: np.ndarray, header: Any) -> np.ndarray:
    """BSCALE/BZERO/BLANK as astropy applies them (unsigned-integer offsets kept integer)."""
    bscale, bzero = float(header.get("BSCALE", 1.0)), float(header.get("BZERO", 0.0))
    kind, bits = rows.dtype.kind, rows.dtype.itemsize * 8
    if kind == "i" and bscale == 1.0 and bzero == 2.0 ** (bits - 1) and "BLANK" not in header:
        return (rows.astype(np.int64) + int(bzero)).astype(f"u{bits // 8}")
    if bscale == 1.0 and bzero == 0.0 and "BLANK" not in header:
        return rows.astype(rows.dtype.newbyteorder("="))
    wide = bits == 64 if kind == "f" else bits > 16  # astropy: int16 -> float32, int32 -> 64
    out = rows.astype(np.float64 if wide else np.float32)
    if kind in "iu" and "BLANK" in header:
        out[rows == int(header["BLANK"])] = np.nan
    return out * bscale + bzero


def read_partial(raw: bytes, src: Source, policy: ReadPolicy, compression: str | None
                 ) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The present rows of the first plane of a truncated FITS file, or None when too few
    are there (or the file is not truncated inside an uncompressed image's data)."""
    found = _image_header(raw)
    if found is None:
        return None
    header, start, index = found
    dtype = _DTYPES.get(int(header.get("BITPIX", 0)))
    if dtype is None:
        return None
    width, height = int(header["NAXIS1"]), int(header["NAXIS2"])
    row_bytes = width * np.dtype(dtype).itemsize
    present = min(height, max(0, len(raw) - start) // row_bytes)
    if present >= height or present == 0 or present < policy.fits_partial_min * height:
        return None
    rows = np.frombuffer(raw, dtype=dtype, count=present * width, offset=start)
    values = _scaled(rows.reshape(present, width), header)
    fill = policy.nonfinite_fill if values.dtype.kind == "f" else 0
    array = np.full((height, width), fill, dtype=values.dtype)
    array[:present] = values
    share = present / height
    meta: dict[str, Any] = {
        "format": "fits", "compression": compression, "hdu": index, "planes": 1,
        "hdu_type": "PrimaryHDU" if index == 0 else "ImageHDU",
        "header": header_dict(header),
        "partial": {"rows_read": present, "rows": height, "fraction": round(share, 6)},
        "conversions": [f"fits_partial_{present}_of_{height}_rows_missing->{fill:g}"],
    }
    return array, meta


def _prefix(src: Source, compression: str | None, limit: int) -> bytes:
    """The first ``limit`` bytes of the file, decompressed as far as the stream goes (a
    decompressor object hands over what it could decode; a file object raises at the cut)."""
    with src.open() as fh:
        raw = fh.read(limit if compression is None else max(limit, src.size))
    if compression is None:
        return raw
    import bz2
    import zlib

    dec: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if compression == "gzip" \
        else bz2.BZ2Decompressor()
    try:
        return dec.decompress(raw, limit)
    except (OSError, EOFError, ValueError, zlib.error):
        return b""


def salvage(src: Source, compression: str | None, policy: ReadPolicy
            ) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Try :func:`read_partial` on the bytes that exist, up to the decode budget."""
    if policy.fits_partial_min >= 1:
        return None
    try:
        raw = _prefix(src, compression, policy.max_decoded_bytes + 64 * BLOCK)
    except OSError:
        return None
    return read_partial(raw, src, policy, compression)
