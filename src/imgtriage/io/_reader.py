"""The one entry point: a path or bytes in, an ImageRecord or a Defect out.

The format is decided from the bytes; the name's extension must agree with them. Each
format's reader raises ``ReadFailure``; this module turns that into a ``Defect`` and makes sure
nothing else escapes for a bad file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from imgtriage.errors import ImageReadError
from imgtriage.io._finish import finish
from imgtriage.io._sniff import (
    EXTENSION_FORMATS,
    FORMAT_NAMES,
    sniff_format,
    sniff_gzip_payload,
)
from imgtriage.io._source import ReadFailure, Source, make_source
from imgtriage.io._types import Defect, ImageRecord, ReadPolicy

ImageSource = str | os.PathLike[str] | bytes

_RASTER_FORMATS = ("jpeg", "png", "bmp", "webp", "gif")
_DEFAULT_POLICY = ReadPolicy()


def read_image(
    source: ImageSource, *, policy: ReadPolicy = _DEFAULT_POLICY, name: str | None = None
) -> ImageRecord:
    """Read one image file (or its bytes) into an array in its own dtype plus metadata.

    ``name`` is the display path used in defects and for the extension check; give it when
    ``source`` is raw bytes (an upload). Every failure caused by the file raises
    :class:`~imgtriage.errors.ImageReadError`, whose ``defect`` says why.

    Example:
        >>> rec = read_image("frames/m13_0001.fits")  # doctest: +SKIP
        >>> rec.array.shape, rec.meta["header"]["EXPTIME"]  # doctest: +SKIP
        ((1040, 1392), 30.0)
        >>> read_image(upload_bytes, name="cat.png").meta["mode"]  # doctest: +SKIP
        'RGBA'
    """
    result = try_read_image(source, policy=policy, name=name)
    if isinstance(result, Defect):
        raise ImageReadError(result)
    return result


def try_read_image(
    source: ImageSource, *, policy: ReadPolicy = _DEFAULT_POLICY, name: str | None = None
) -> ImageRecord | Defect:
    """Like :func:`read_image`, but return the :class:`Defect` instead of raising it.

    Batch code uses this so one bad file becomes one entry in the defect log.

    Example:
        >>> out = try_read_image(b"not an image", name="upload.png")
        >>> out.issue
        'format_mismatch'
    """
    if not isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        raise TypeError(
            f"source must be a path or bytes, not {type(source).__name__}; "
            "pass a str/pathlib.Path or the file's raw bytes"
        )
    display = name if name is not None else _display(source)
    try:
        src = make_source(source, name)
        return _decode(src, policy)
    except ReadFailure as failure:
        return Defect(display, failure.issue, failure.message)
    except Exception as exc:
        # A decoder failed in a way its reader did not anticipate: still the file's fault.
        message = f"'{display}' could not be decoded: {type(exc).__name__}: {exc}"
        return Defect(display, "decode_error", message)


def check_format(source: ImageSource, *, name: str | None = None) -> Defect | None:
    """None when ``source``'s bytes are an image format imgtriage reads, else the
    :class:`Defect` reading it would give (same issue and message as :func:`try_read_image`).

    Only the first bytes are read and nothing is decoded, so a folder can be sorted into
    images and other files by content, whatever the names (a PNG without an extension is an
    image; a text file is not), the way reading decides.

    Example:
        >>> check_format(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(24), name="scan") is None
        True
        >>> check_format(b"hello", name="notes").issue
        'unsupported_format'
    """
    display = name if name is not None else _display(source)
    try:
        detect_format(make_source(source, name))
    except ReadFailure as failure:
        return Defect(display, failure.issue, failure.message)
    return None


def read_array(array: Any, *, policy: ReadPolicy = _DEFAULT_POLICY,
               name: str = "array") -> ImageRecord:
    """An in-memory image (any numeric dtype, (H, W) or (H, W, C)) through the same final step
    as a file read: non-finite values filled by ``policy``, the constant-image flag.

    An array of unusable shape or dtype raises :class:`~imgtriage.errors.ImageReadError`
    (``bad_shape``), as a file would.

    Example:
        >>> rec = read_array(np.zeros((4, 5), np.uint8), name="blank")
        >>> rec.array.shape, rec.meta["format"], rec.meta["degenerate"]
        ((4, 5), 'array', True)
    """
    a = np.asarray(array)
    if a.dtype.kind not in "biufc" or a.ndim not in (2, 3) or 0 in a.shape:
        raise ImageReadError(Defect(name, "bad_shape",
                                    f"expected a numeric (H, W) or (H, W, C) array, got "
                                    f"dtype {a.dtype} and shape {tuple(a.shape)}"))
    return finish(np.array(a), {"format": "array"}, policy)


def _display(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    return "<bytes>"


def _decode(src: Source, policy: ReadPolicy) -> ImageRecord:
    fmt, compression = detect_format(src)
    if fmt in _RASTER_FORMATS:
        from imgtriage.io._raster import read_raster

        array, meta = read_raster(src, fmt, policy)
    elif fmt == "tiff":
        from imgtriage.io._tiff import read_tiff

        array, meta = read_tiff(src, policy)
    else:
        from imgtriage.io._fits import read_fits

        array, meta = read_fits(src, compression, policy)
    meta["bytes"] = src.size
    return finish(_checked_2d(src, array), meta, policy)


def _checked_2d(src: Source, array: np.ndarray) -> np.ndarray:
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise ReadFailure(
            "bad_shape",
            f"'{src.display}' decoded to an array of shape {array.shape}; "
            "an image must be (H, W) or (H, W, C) with no empty axis",
        )
    return array


def detect_format(src: Source) -> tuple[str, str | None]:
    """``(image format, compression)`` from the bytes, checked against the extension.

    Raises ``ReadFailure`` with ``format_mismatch`` or ``unsupported_format``.
    """
    sniffed = sniff_format(src.head)
    compression = None
    if sniffed in ("gzip", "bzip2"):
        compression = sniffed
        if sniffed == "gzip":
            inner = sniff_gzip_payload(src.head)
        else:  # bzip2 cannot be peeked at cheaply (900 kB blocks): trust a FITS name
            inner = "fits" if EXTENSION_FORMATS.get(src.extension) == "fits" else None
        if inner != "fits":
            raise _compressed_failure(src, compression)
        sniffed = "fits"
    claimed = EXTENSION_FORMATS.get(src.extension)
    if sniffed is None:
        if claimed is not None:
            raise ReadFailure(
                "format_mismatch",
                f"'{src.display}' is named like a {FORMAT_NAMES[claimed]} file "
                f"({src.extension}) but its bytes are not any image format imgtriage knows "
                f"(they start with {src.head[:8]!r}); re-export or replace the file",
            )
        raise ReadFailure(
            "unsupported_format",
            f"'{src.display}' is not an image format imgtriage reads (bytes start with "
            f"{src.head[:8]!r}); supported: JPEG, PNG, BMP, WebP, GIF, TIFF, FITS",
        )
    if claimed is not None and claimed != sniffed:
        raise ReadFailure(
            "format_mismatch",
            f"'{src.display}' holds {_what(sniffed, compression)} data but its extension "
            f"{src.extension} claims {FORMAT_NAMES[claimed]}; rename the file to end in "
            f"{_suggested_extension(sniffed, compression)}",
        )
    return sniffed, compression


def _what(fmt: str, compression: str | None) -> str:
    name = FORMAT_NAMES[fmt]
    return f"{FORMAT_NAMES[compression]} {name}" if compression else name


def _suggested_extension(fmt: str, compression: str | None) -> str:
    if compression == "gzip":
        return ".fits.gz"
    if compression == "bzip2":
        return ".fits.bz2"
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")


def _compressed_failure(src: Source, compression: str) -> ReadFailure:
    """gzip/bzip2 bytes that are not a FITS file imgtriage can read."""
    claimed = EXTENSION_FORMATS.get(src.extension)
    issue = "format_mismatch" if claimed is not None else "unsupported_format"
    hint = ".fits.gz" if compression == "gzip" else ".fits.bz2"
    return ReadFailure(
        issue,
        f"'{src.display}' is {FORMAT_NAMES[compression]} data that is not a FITS file "
        f"imgtriage can read; only compressed FITS files named *{hint} are read",
    )
