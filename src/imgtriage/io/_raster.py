"""JPEG, PNG, BMP, WebP and GIF through Pillow: header checks first, then decode and convert.

The size is checked from the header before any pixel is decoded, EXIF orientation is applied
so a phone photo comes out the way it was shot, and every PIL mode is mapped to one array
layout (see :func:`mode_to_array`).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgtriage.io._budget import check_bytes, check_time
from imgtriage.io._sniff import FORMAT_NAMES
from imgtriage.io._source import ReadFailure, Source
from imgtriage.io._types import ReadPolicy

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "webp": "WEBP", "gif": "GIF"}
# The bytes every complete file of the format ends with (a missing trailer means truncation).
_TRAILERS = {"png": b"IEND\xaeB`\x82", "jpeg": b"\xff\xd9", "gif": b";"}
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


def read_raster(src: Source, fmt: str, policy: ReadPolicy) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode one raster file into ``(array, meta)``; raise ``ReadFailure`` on any failure."""
    meta: dict[str, Any] = {"format": fmt, "conversions": []}
    with ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fh = stack.enter_context(src.open())
            img = stack.enter_context(Image.open(fh, formats=[_PIL_FORMATS[fmt]]))
            _check_pixels(src, img.size, policy)
            array = _decode(src, img, fmt, policy, meta)
        except ReadFailure:
            raise
        except Image.DecompressionBombError as exc:
            raise _too_many(src, str(exc)) from None
        except Exception as exc:
            raise _decoder_failure(src, fmt, exc) from None
    return array, meta


def _decode(src: Source, img: Image.Image, fmt: str, policy: ReadPolicy,
            meta: dict[str, Any]) -> np.ndarray:
    """Pixels of the first frame, upright, in the array layout of its mode."""
    meta["mode"] = img.mode
    meta["frames"] = int(getattr(img, "n_frames", 1))
    if meta["frames"] > 1:
        meta["conversions"].append(f"first_frame_of_{meta['frames']}")
    orientation = None
    if fmt == "jpeg" and policy.jpeg_draft_size is not None:
        # JPEG EXIF is parsed with the header; for PNG/WebP getexif() would decode the pixels.
        orientation = _orientation(img, meta)
        _draft(img, policy.jpeg_draft_size, orientation, meta)
    wide = _png16_rawmode(img) if fmt == "png" else None
    # a 16-bit PNG: two 8-bit passes joined into uint16, 4 bytes a sample at the peak
    _check_budget(src, img, policy, 4 * len(img.mode) if wide else None)
    img.load()
    low = _png16_low_bytes(src, wide, meta["conversions"]) if wide else None
    check_time(src, policy, "after decoding the pixels")
    if orientation is None:
        orientation = _orientation(img, meta)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        low = ImageOps.exif_transpose(low) if low is not None else None
        meta["conversions"].append("exif_transpose")
    if low is not None:  # Pillow keeps 8 bits of a 16-bit RGB(A) PNG: join both halves
        meta["bits"] = 16
        return (np.asarray(img).astype(np.uint16) << 8) | np.asarray(low)
    return mode_to_array(img, meta["conversions"])


# Pillow decodes 16-bit RGB(A) PNGs to 8 bits per sample (the high byte of each). Decoding the
# same stream again with the little-endian unpacker keeps the *other* byte (the filters are
# undone the same way: both unpack 6 or 8 bytes a pixel), so two passes give every bit.
_PNG16_LOW = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


def _png16_rawmode(img: Image.Image) -> str | None:
    """The raw mode of a 16-bit RGB or RGBA PNG (before ``load``), else None."""
    tile = getattr(img, "tile", None) or []
    raw = tile[0].args if len(tile) == 1 else None
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    return raw if raw in _PNG16_LOW else None


def _png16_low_bytes(src: Source, rawmode: str, conversions: list[str]
                     ) -> Image.Image | None:
    """The low byte of every sample of a 16-bit RGB(A) PNG, as an 8-bit PIL image; None (the
    high bytes alone, said in ``conversions``) where this Pillow's tile API differs (the
    second pass relies on how Pillow describes a PNG's pixel stream, not a public API)."""
    from PIL import ImageFile

    try:
        with src.open() as fh, Image.open(fh, formats=["PNG"]) as img:
            (tile,) = img.tile
            img.tile = [ImageFile._Tile(tile.codec_name, tile.extents, tile.offset,
                                        _PNG16_LOW[rawmode])]
            img.load()
            return img.copy()
    except (AttributeError, TypeError, ValueError, OSError):
        conversions.append("png16_high_bytes_only")
        return None


# Bytes per pixel Pillow holds for a mode (its 3-band modes take 4) or, when larger, the
# array the mode becomes (a palette image becomes RGB(A)).
_MODE_BYTES = {"1": 1, "L": 1, "P": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "I;16S": 2}


def _check_budget(src: Source, img: Image.Image, policy: ReadPolicy,
                  per_pixel: int | None = None) -> None:
    """The decoded size from the header (after any JPEG draft), before a pixel is decoded."""
    width, height = img.size
    per_pixel = per_pixel or _MODE_BYTES.get(img.mode, 4)
    check_bytes(src, f"a {width}x{height} {img.mode} image", (width, height), per_pixel,
                policy, plane_pixels=width * height)


def _check_pixels(src: Source, size: tuple[int, int], policy: ReadPolicy) -> None:
    width, height = size
    if width * height > policy.max_pixels:
        raise ReadFailure(
            "too_many_pixels",
            f"'{src.display}' is {width}x{height} = {width * height} pixels, over the limit "
            f"of {policy.max_pixels} (ReadPolicy.max_pixels); downscale it or raise the "
            "limit (--max-pixels)",
        )


def _too_many(src: Source, detail: str) -> ReadFailure:
    """Pillow's own decompression-bomb guard fired (it applies whatever the policy says, so
    --max-pixels cannot lift it: only the Python global can)."""
    return ReadFailure(
        "too_many_pixels",
        f"'{src.display}' is over Pillow's own decompression-bomb limit of "
        f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels ({detail}), which holds whatever "
        "--max-pixels says; downscale it, or tile it (from Python: raise "
        "PIL.Image.MAX_IMAGE_PIXELS as well as ReadPolicy.max_pixels)",
    )


def _decoder_failure(src: Source, fmt: str, exc: Exception) -> ReadFailure:
    """Map a Pillow exception to ``truncated`` or ``decode_error`` with the decoder's words."""
    text = str(exc) or type(exc).__name__
    trailer = _TRAILERS.get(fmt)
    ends_early = trailer is not None and not src.tail(64).rstrip(b"\x00").endswith(trailer)
    if isinstance(exc, EOFError) or "truncated" in text.lower() or ends_early:
        return ReadFailure(
            "truncated",
            f"'{src.display}' ends before the {FORMAT_NAMES[fmt]} image does ({text}); "
            "the file was cut short, re-download or re-copy it",
        )
    if isinstance(exc, UnidentifiedImageError):
        text = f"its header is not a valid {FORMAT_NAMES[fmt]} header"
    return ReadFailure(
        "decode_error", f"'{src.display}' could not be decoded as {FORMAT_NAMES[fmt]}: {text}"
    )


def _orientation(img: Image.Image, meta: dict[str, Any]) -> int:
    """EXIF orientation, 1 (upright) when absent; unreadable or invalid tags are recorded."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION)
        orientation = int(value) if value is not None else 1
    except Exception:
        meta["conversions"].append("exif_unreadable")
        orientation = 1
    if not 1 <= orientation <= 8:
        meta["conversions"].append(f"exif_orientation_invalid_{orientation}")
        orientation = 1
    meta["exif_orientation"] = orientation
    return orientation


def _draft(
    img: Image.Image, size_hw: tuple[int, int], orientation: int, meta: dict[str, Any]
) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= ``size_hw`` after rotation."""
    height, width = size_hw
    # Draft works on the stored image; a 90-degree EXIF rotation swaps its axes afterwards.
    stored = (height, width) if orientation in _ROTATING_ORIENTATIONS else (width, height)
    full_width = img.size[0]
    mode = img.mode if img.mode in ("RGB", "L", "CMYK") else None
    img.draft(mode, stored)
    scale = max(1, round(full_width / max(img.size[0], 1)))
    meta["jpeg_draft_scale"] = scale
    if scale > 1:
        meta["conversions"].append("jpeg_draft")


def mode_to_array(img: Image.Image, conversions: list[str]) -> np.ndarray:
    """One array layout per PIL mode: 2-D for one channel, channels last otherwise.

    "1" -> uint8 0/255; "L" -> uint8; "P"/"PA" -> RGBA with transparency else RGB; "LA" ->
    (H, W, 2); "CMYK"/"YCbCr"/"LAB"/"HSV" -> RGB; "I;16*" -> uint16; "I" -> int32, or uint16
    when every value fits; "F" -> float32.

    Example:
        >>> mode_to_array(Image.new("1", (2, 2), 1), []).tolist()
        [[255, 255], [255, 255]]
    """
    mode = img.mode
    if mode == "1":
        conversions.append("1->L")
        return np.array(img.convert("L"))
    if mode in ("L", "LA", "RGB", "RGBA", "F"):
        return np.array(img)
    if mode in ("P", "PA"):
        target = "RGBA" if mode == "PA" or "transparency" in img.info else "RGB"
        conversions.append(f"palette->{target}")
        return np.array(img.convert(target))
    if mode.startswith("I;16"):
        array = np.array(img)  # uint16 in either byte order, or int16 for "I;16S"
        return array if array.dtype.kind == "i" else array.astype(np.uint16)
    if mode == "I":
        return _int32_array(np.array(img), conversions)
    target = {"La": "LA", "RGBa": "RGBA", "RGBA;16B": "RGBA"}.get(mode, "RGB")
    conversions.append(f"{mode.lower()}->{target.lower()}")
    return np.array(img.convert(target))


def _int32_array(array: np.ndarray, conversions: list[str]) -> np.ndarray:
    array = array.astype(np.int32)
    if array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
        conversions.append("int32->uint16")
        return array.astype(np.uint16)
    return array
