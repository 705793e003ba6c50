"""Plain records the readers return: an image with its metadata, or a typed defect."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from imgtriage.errors import ConfigError

# Every reason a file can be refused. Reports, the service and the defect log use these strings.
DEFECT_ISSUES = (
    "not_found",  # the path does not exist
    "permission_denied",  # the file exists but cannot be opened
    "empty_file",  # zero bytes
    "truncated",  # the data ends before the image does
    "format_mismatch",  # the bytes are not what the extension says (e.g. text named .png)
    "unsupported_format",  # bytes of a kind imgtriage does not read
    "too_many_pixels",  # over ReadPolicy.max_pixels (decompression bombs)
    "too_large",  # decoding would take more than ReadPolicy.max_decoded_bytes of memory
    "too_many_pages",  # more pages/planes/HDUs than ReadPolicy.max_pages
    "decode_timeout",  # decoding took longer than ReadPolicy.decode_timeout_s
    "not_regular_file",  # a FIFO, socket or device: never opened for a blocking read
    "no_image_data",  # a FITS/TIFF container without any image
    "decode_error",  # the decoder failed for another reason
    "bad_shape",  # the image cannot become the model's input (e.g. channel count)
    "bad_base64",  # the service: an item of a JSON request is not valid base64 (no bytes)
)

DefectIssue = Literal[
    "not_found",
    "permission_denied",
    "empty_file",
    "truncated",
    "format_mismatch",
    "unsupported_format",
    "too_many_pixels",
    "too_large",
    "too_many_pages",
    "decode_timeout",
    "not_regular_file",
    "no_image_data",
    "decode_error",
    "bad_shape",
    "bad_base64",
]


@dataclass(frozen=True)
class Defect:
    """Why one file did not become a result. Serialises to ``{path, issue, message}``."""

    path: str
    issue: str
    message: str

    def __post_init__(self) -> None:
        if self.issue not in DEFECT_ISSUES:
            raise ValueError(
                f"unknown defect issue {self.issue!r}; expected one of {DEFECT_ISSUES}"
            )

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "issue": self.issue, "message": self.message}


# The decode budget's defaults: two decode threads at the limit stay under ~1 GB together,
# the float copy preprocessing makes included (see docs/service.md, "Decode budget").
DEFAULT_MAX_DECODED_BYTES = 64 * 2**20
DEFAULT_MAX_PAGES = 256
DEFAULT_DECODE_TIMEOUT_S = 30.0
# Schema bounds: a policy (from a bundle manifest, say) outside them is refused, not obeyed.
_MAX_PIXELS_BOUND = 10**10
_MAX_BYTES_BOUND = 2**34  # 16 GiB
_MAX_PAGES_BOUND = 100_000
_MAX_TIMEOUT_BOUND = 3600.0


@dataclass(frozen=True)
class ReadPolicy:
    """How readers treat the awkward cases. Travels in the bundle's preprocessing block.

    The decode budget (``max_pixels``, ``max_decoded_bytes``, ``max_pages``,
    ``decode_timeout_s``) is checked from the file's headers before the pixels are allocated
    wherever the format allows (PNG/JPEG/GIF/BMP/WebP, TIFF IFDs, FITS headers); every entry
    point (predict, serve, train, evaluate) reads through it. Over budget, a file becomes a
    ``too_many_pixels``, ``too_large``, ``too_many_pages`` or ``decode_timeout`` defect.

    Attributes:
        max_pixels: refuse images with more pixels (height*width) than this (decompression bombs).
        max_decoded_bytes: refuse files whose decoded data would take more bytes than this
            (pixels x channels x bytes per sample x pages/planes kept; for FITS the whole
            HDU when it must be read whole: compressed, scaled or streamed), and at least one
            float32 plane of the image (height x width x 4, what preprocessing works in).
        max_pages: refuse files needing more pages, planes, frames or HDUs than this.
        decode_timeout_s: wall-clock seconds one file may take to decode; checked between the
            decoder's steps (a file over it becomes ``decode_timeout``).
        multipage: ``"first"`` keeps the first page/plane of a multi-page TIFF,
            ``"channels"`` stacks pages as channels (they must share one shape).
        nonfinite_fill: value that replaces NaN/+Inf/-Inf in float data (counted in metadata).
        jpeg_draft_size: when set (h, w), JPEGs may be decoded at a reduced scale that is still
            at least this size (PIL draft mode); ``None`` decodes at full size.
        fits_partial_min: a FITS file cut short inside its image data is read partially when
            at least this share of the image's rows is present: the missing rows are filled
            with ``nonfinite_fill`` and ``meta["partial"]`` says how many were read (results
            are flagged ``partial``); below it, or at 1, it is a ``truncated`` defect.
    """

    max_pixels: int = 100_000_000
    multipage: Literal["first", "channels"] = "first"
    nonfinite_fill: float = 0.0
    jpeg_draft_size: tuple[int, int] | None = None
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    max_pages: int = DEFAULT_MAX_PAGES
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S
    fits_partial_min: float = 0.5

    def __post_init__(self) -> None:
        _bounded_int(self.max_pixels, 1, _MAX_PIXELS_BOUND, "max_pixels", "--max-pixels")
        _bounded_int(self.max_decoded_bytes, 1, _MAX_BYTES_BOUND, "max_decoded_bytes",
                     "--max-decoded-bytes")
        _bounded_int(self.max_pages, 1, _MAX_PAGES_BOUND, "max_pages", "--max-pages")
        timeout = self.decode_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
                0 < timeout <= _MAX_TIMEOUT_BOUND):
            raise ConfigError(f"decode_timeout_s must be a number of seconds in (0, "
                              f"{_MAX_TIMEOUT_BOUND:g}], got {timeout!r} (--decode-timeout)")
        if not isinstance(self.nonfinite_fill, int | float) or isinstance(
                self.nonfinite_fill, bool) or not math.isfinite(self.nonfinite_fill):
            raise ConfigError(f"nonfinite_fill must be a finite number, got "
                              f"{self.nonfinite_fill!r}")
        draft = self.jpeg_draft_size
        if draft is not None and (len(draft) != 2 or any(
                isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65_535
                for v in draft)):
            raise ConfigError(f"jpeg_draft_size must be two integers in 1..65535, got {draft!r}")
        share = self.fits_partial_min
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigError(f"fits_partial_min must be a share in (0, 1], got {share!r} "
                              "(1 turns partial FITS reads off)")
        if self.multipage not in ("first", "channels"):
            raise ConfigError("multipage must be 'first' or 'channels' (--multipage)")


def _bounded_int(value: object, lo: int, hi: int, name: str, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {value!r} ({flag})")


@dataclass(frozen=True)
class ImageRecord:
    """A decoded image in its native dtype, with what was learned while reading it.

    ``array`` is ``(H, W)`` for one channel or ``(H, W, C)`` for several, in the file's own dtype
    (uint8, uint16, int16, int32, float32, float64 ...). ``meta`` always holds ``format``
    (``"jpeg"``, ``"png"``, ``"tiff"``, ``"fits"`` ...), ``dtype``, ``shape``, ``channels``,
    ``nonfinite`` (count of replaced NaN/Inf values), ``degenerate`` (True for a constant image)
    and ``alpha`` (True when the last channel is transparency: LA/RGBA, a TIFF whose
    ExtraSamples tag says alpha; False for the bands of a multispectral TIFF or a FITS cube);
    FITS adds ``header`` (card name -> value) and ``hdu``; photos add ``mode`` and
    ``exif_orientation``; readers note every conversion rule they applied in ``conversions``.
    """

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
