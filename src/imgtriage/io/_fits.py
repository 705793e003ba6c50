"""FITS through astropy: the first image HDU, its header, and its pixels with BSCALE/BZERO applied.

Plain files are memory-mapped and only the plane that is kept is copied out, so a large cube
costs one plane of memory; the file is closed before returning. ``.fits.gz``, ``.fits.bz2``,
tile-compressed (``.fz``) HDUs and headers missing their END card all read. A file cut short
inside its image data reads partially, flagged (``io/_fits_partial.py``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
import warnings
from typing import Any, BinaryIO

import numpy as np

from imgtriage.io._budget import check_bytes, check_pages, check_time
from imgtriage.io._fits_header import header_dict, restore_end_card
from imgtriage.io._fits_partial import salvage
from imgtriage.io._source import ReadFailure, Source
from imgtriage.io._types import ReadPolicy


def read_fits(
    src: Source, compression: str | None, policy: ReadPolicy
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the first image HDU of a FITS file; ``compression`` is "gzip", "bzip2" or None.

    When astropy fails and the primary header turns out to lack its END card, the card is
    put back and the file read again (recorded as ``fits_end_card_restored``).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded here, never shown to the user
        try:
            return _read(src, compression, None, policy)
        except ReadFailure:
            raise
        except Exception as exc:
            failure = _decoder_failure(src, exc, [str(w.message) for w in caught])
        # astropy calls a cut .fits.gz "corrupt": the stream itself says how far it goes
        if failure.issue == "truncated" or (compression and failure.issue == "decode_error"):
            partial = salvage(src, compression, policy)
            if partial is not None:
                return partial
        repaired = _repaired_bytes(src, compression)
        if repaired is None:
            raise failure
        try:
            array, meta = _read(src, compression, repaired, policy)
        except ReadFailure:
            raise
        except Exception:
            raise failure from None
    meta["conversions"].append("fits_end_card_restored")
    return array, meta


def _read(
    src: Source, compression: str | None, repaired: bytes | None, policy: ReadPolicy
) -> tuple[np.ndarray, dict[str, Any]]:
    meta: dict[str, Any] = {"format": "fits", "conversions": [], "compression": compression}
    if compression is not None and repaired is None:
        _check_compressed_primary(src, compression, policy)
    with _open_hdul(src, compression, repaired) as hdul:
        return _read_first_image(src, hdul, policy, meta), meta


_MAX_HEADER_BLOCKS = 1000  # 2.8 MB of header cards


def _check_compressed_primary(src: Source, compression: str, policy: ReadPolicy) -> None:
    """Walk the HDU headers of a gzip/bzip2 stream before astropy opens it.

    astropy moves past each HDU's data to find the next header, which in a compressed
    stream means inflating all of it: a cube of gigabytes would be inflated just to be
    refused. Here each header's cards give its data size; an HDU over the budget is refused
    before a byte of its data is inflated, and the walk stops at the first image HDU.
    """
    inflated = 0
    with _stream(src, compression) as stream:
        for index in range(policy.max_pages):
            cards = _header_cards(src, stream, policy)
            if cards is None:
                return  # truncated or malformed: astropy's reading says what is wrong
            dims, size = _hdu_size(cards)
            if dims is None:
                return
            shape = "x".join(str(d) for d in dims) or "no"
            what = f"HDU {index}, {shape} values decompressed whole,"
            check_bytes(src, what, (size,), 1, policy)
            inflated += size
            check_bytes(src, f"{index + 1} HDUs decompressed to reach the image", (inflated,),
                        1, policy)
            if len(dims) >= 2 and all(d > 0 for d in dims):
                return  # the first image: astropy reads it, within the budget
            _skip(stream, size + (-size % 2880))
            check_time(src, policy, f"walking to HDU {index + 1}")
    check_pages(src, policy.max_pages + 1, "HDUs (headers) to be walked to find the image",
                policy)


def _header_cards(src: Source, stream: BinaryIO, policy: ReadPolicy) -> dict[str, str] | None:
    """The ``KEY = value`` cards of the next header (first occurrence), None at a bad end."""
    cards: dict[str, str] = {}
    for _ in range(_MAX_HEADER_BLOCKS):
        block = stream.read(2880)
        if len(block) < 2880:
            return None
        for i in range(0, 2880, 80):
            key = block[i:i + 8].decode("ascii", "replace").strip()
            if key == "END":
                return cards
            if block[i + 8:i + 10] == b"= " and key not in cards:
                cards[key] = block[i + 10:i + 80].split(b"/")[0].decode(
                    "ascii", "replace").strip()
    check_pages(src, _MAX_HEADER_BLOCKS + 1, "header blocks in one header", policy)
    return None


def _hdu_size(cards: dict[str, str]) -> tuple[list[int] | None, int]:
    """(NAXISn, data bytes) from a header's cards: |BITPIX|/8 x GCOUNT x (PCOUNT + prod)."""
    try:
        naxis = int(cards.get("NAXIS", "0"))
        dims = [int(cards.get(f"NAXIS{k}", "0")) for k in range(1, min(naxis, 999) + 1)]
        itemsize = abs(int(cards.get("BITPIX", "8"))) // 8
        pcount, gcount = int(cards.get("PCOUNT", "0")), int(cards.get("GCOUNT", "1"))
    except ValueError:
        return None, 0
    if any(d < 0 for d in dims) or pcount < 0 or gcount < 0:
        return None, 0
    elements = math.prod(dims[1:] if dims and dims[0] == 0 else dims) if dims else 0
    return dims, max(itemsize, 1) * gcount * (pcount + elements) if dims or pcount else 0


def _skip(stream: BinaryIO, nbytes: int) -> None:
    while nbytes > 0:
        chunk = stream.read(min(nbytes, 2**20))
        if not chunk:
            return
        nbytes -= len(chunk)


def _stream(src: Source, compression: str | None) -> BinaryIO:
    """The decompressed FITS byte stream of the input (the caller closes it)."""
    raw = src.open()
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "bzip2":
        return bz2.BZ2File(raw, mode="rb")  # type: ignore[return-value]
    return raw


def _repaired_bytes(src: Source, compression: str | None) -> bytes | None:
    """The file with its primary END card restored, or None when the header is intact."""
    try:
        with _stream(src, compression) as stream:
            return restore_end_card(stream)
    except (OSError, EOFError, ValueError):
        return None


def _open_hdul(src: Source, compression: str | None, repaired: bytes | None) -> Any:
    from astropy.io import fits

    options = {"ignore_missing_end": True, "lazy_load_hdus": True}
    if repaired is not None:
        return fits.open(io.BytesIO(repaired), memmap=False, **options)
    if src.path is not None:
        # memmap=None maps the file too, but unlike memmap=True ("strict") it still lets
        # astropy apply BSCALE/BZERO/BLANK, which it does into a fresh array.
        return fits.open(src.path, memmap=None, **options)
    return fits.open(_stream(src, compression), memmap=False, **options)


def _is_image(hdu: Any) -> bool:
    """A primary, image or tile-compressed HDU with at least two non-empty axes."""
    from astropy.io import fits

    if isinstance(hdu, fits.GroupsHDU) or not isinstance(
        hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU
    ):
        return False
    naxis = int(hdu.header.get("NAXIS", 0))
    dims = [int(hdu.header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)]
    return naxis >= 2 and all(d > 0 for d in dims)


def _read_first_image(
    src: Source, hdul: Any, policy: ReadPolicy, meta: dict[str, Any]
) -> np.ndarray:
    """Find the first image HDU, record its header, check its size, copy its pixels out."""
    seen = []
    for index, hdu in enumerate(hdul):
        seen.append(type(hdu).__name__)
        check_pages(src, index + 1, "HDUs (headers) to be walked to find the image", policy)
        check_time(src, policy, f"walking to HDU {index}")
        if not _is_image(hdu):
            continue
        meta["hdu"] = index
        meta["hdu_type"] = type(hdu).__name__
        # Before .data: astropy drops BSCALE/BZERO from the header once it scales the data.
        meta["header"] = header_dict(hdu.header)
        if index > 0:
            meta["primary_header"] = header_dict(hdul[0].header)
        width, height = int(hdu.header["NAXIS1"]), int(hdu.header["NAXIS2"])
        if width * height > policy.max_pixels:
            raise ReadFailure(
                "too_many_pixels",
                f"'{src.display}' HDU {index} is {width}x{height} ({width * height} pixels; "
                "the limit is ReadPolicy.max_pixels); raise the limit (--max-pixels)",
            )
        _check_budget(src, hdu, index, policy)
        return _pixels(hdu, policy, meta)
    raise ReadFailure(
        "no_image_data",
        f"'{src.display}' has no image HDU with two or more axes (HDUs: {', '.join(seen)}); "
        "tables and header-only files cannot be classified",
    )


_SCALE_CARDS = ("BSCALE", "BZERO", "BLANK")


def _check_budget(src: Source, hdu: Any, index: int, policy: ReadPolicy) -> None:
    """The decoded size from the header alone, before astropy touches the data.

    astropy reads the whole HDU into memory when it cannot map it (``.fits.gz``/``.bz2``,
    uploads, tile-compressed HDUs) and scales the whole HDU to float when BSCALE/BZERO/BLANK
    are set; only an unscaled plain file on disk is mapped, so only the kept planes count.
    """
    from astropy.io import fits

    header = hdu.header
    dims = [int(header.get(f"NAXIS{k}", 0)) for k in range(1, int(header["NAXIS"]) + 1)]
    planes = math.prod(dims[2:])
    itemsize = abs(int(header.get("BITPIX", 8))) // 8
    scaled = any(card in header for card in _SCALE_CARDS)
    if scaled:
        itemsize = max(itemsize, 4) if itemsize <= 2 else 8  # astropy scales to float32/64
    kept = planes if policy.multipage == "channels" else 1
    if policy.multipage == "channels":
        check_pages(src, planes, "planes stacked as channels", policy)
    whole = scaled or isinstance(hdu, fits.CompImageHDU) or src.path is None or _compressed(src)
    shape = "x".join(str(d) for d in dims)
    if whole:
        check_bytes(src, f"HDU {index}, a {shape} array read whole", dims, itemsize, policy,
                    plane_pixels=dims[0] * dims[1])
    else:
        check_bytes(src, f"HDU {index}: {kept} plane(s) of {dims[0]}x{dims[1]}",
                    (dims[0], dims[1], kept), itemsize, policy,
                    plane_pixels=dims[0] * dims[1])


def _compressed(src: Source) -> bool:
    return src.head[:2] == b"\x1f\x8b" or src.head[:3] == b"BZh"


def _pixels(hdu: Any, policy: ReadPolicy, meta: dict[str, Any]) -> np.ndarray:
    """The kept plane(s) as a native-endian copy; cubes follow ``policy.multipage``."""
    data = hdu.data
    height, width = data.shape[-2:]
    planes = data.reshape(-1, height, width)
    count = planes.shape[0]
    meta["planes"] = count
    native = planes.dtype.newbyteorder("=")
    if count == 1 or policy.multipage == "first":
        array = np.array(planes[0], dtype=native, order="C", copy=True)
        if count > 1:
            meta["conversions"].append(f"first_plane_of_{count}")
    else:
        array = np.array(np.moveaxis(planes, 0, -1), dtype=native, order="C", copy=True)
        meta["conversions"].append(f"{count}_planes->channels")
    del data, planes  # release the memmap before the file is closed
    return array


def _decoder_failure(src: Source, exc: Exception, warned: list[str]) -> ReadFailure:
    text = str(exc) or type(exc).__name__
    truncated = [w for w in warned if "truncated" in w.lower()]
    if truncated or isinstance(exc, EOFError) or "buffer is too small" in text:
        detail = truncated[0] if truncated else text
        return ReadFailure(
            "truncated",
            f"'{src.display}' ends before its FITS data does ({detail}); re-copy it",
        )
    return ReadFailure("decode_error", f"'{src.display}' could not be decoded as FITS: {text}")
