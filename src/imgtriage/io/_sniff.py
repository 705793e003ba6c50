"""Tell what a file is from its first bytes, and what its name claims it is.

The bytes decide; the extension is only checked against them. A PNG named ``.jpg`` is refused
rather than silently decoded, because a mislabelled file usually means a broken export step
that the user should hear about.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import PurePath

__all__ = [
    "COMPRESSED_FITS_EXTENSIONS",
    "EXTENSION_FORMATS",
    "FORMAT_NAMES",
    "SUPPORTED_EXTENSIONS",
    "extension_of",
    "is_supported_path",
    "sniff_format",
    "sniff_gzip_payload",
]

# Extension -> the image format its bytes must hold.
EXTENSION_FORMATS: dict[str, str] = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".bmp": "bmp",
    ".webp": "webp",
    ".gif": "gif",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".fits.gz": "fits",
    ".fit.gz": "fits",
    ".fits.bz2": "fits",
    ".fz": "fits",
}

# Double extensions whose bytes are a compressed stream holding a FITS file.
COMPRESSED_FITS_EXTENSIONS: dict[str, str] = {
    ".fits.gz": "gzip",
    ".fit.gz": "gzip",
    ".fits.bz2": "bzip2",
}

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(EXTENSION_FORMATS)

# Human names used in messages.
FORMAT_NAMES: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "webp": "WebP",
    "gif": "GIF",
    "tiff": "TIFF",
    "fits": "FITS",
    "gzip": "gzip-compressed",
    "bzip2": "bzip2-compressed",
}

_FITS_RE = re.compile(rb"^SIMPLE {2}=")
# BITMAPINFOHEADER variants: the size field right after the 14-byte file header.
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}


def extension_of(path: str | os.PathLike[str]) -> str:
    """Return the lower-case extension that decides the format, double ones included.

    Example:
        >>> extension_of("frames/M13.FITS.gz")
        '.fits.gz'
        >>> extension_of("cat.jpg")
        '.jpg'
    """
    suffixes = [s.lower() for s in PurePath(os.fspath(path)).suffixes]
    if len(suffixes) >= 2 and "".join(suffixes[-2:]) in EXTENSION_FORMATS:
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def is_supported_path(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends in an extension imgtriage reads (case-insensitive).

    Example:
        >>> is_supported_path("night/ngc1976.fits.gz"), is_supported_path("notes.txt")
        (True, False)
    """
    return extension_of(path) in SUPPORTED_EXTENSIONS


def sniff_format(head: bytes) -> str | None:
    """Name the format of a file from its first bytes (16 are enough, 64 are safer).

    Returns one of ``"jpeg"``, ``"png"``, ``"bmp"``, ``"webp"``, ``"gif"``, ``"tiff"``,
    ``"fits"``, ``"gzip"``, ``"bzip2"``, or ``None`` when the bytes match none of them.

    Example:
        >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8))
        'png'
        >>> sniff_format(b"hello world") is None
        True
    """
    head = bytes(head[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if _FITS_RE.match(head):
        return "fits"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4] in tuple(b"%d" % i for i in range(1, 10)):
        return "bzip2"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    return None


def sniff_gzip_payload(head: bytes) -> str | None:
    """Sniff what a gzip stream holds from its first compressed bytes, or None if unknown.

    Example:
        >>> import gzip
        >>> sniff_gzip_payload(gzip.compress(b"SIMPLE  =                    T"))
        'fits'
    """
    try:
        inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 64)
    except zlib.error:
        return None
    return sniff_format(inner)
