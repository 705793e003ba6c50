"""Plain records the readers return: an image with its metadata, or a typed defect."""

from __future__ import annotations

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
    "no_image_data",  # a FITS/TIFF container without any image
    "decode_error",  # the decoder failed for another reason
    "bad_shape",  # the image cannot become the model's input (e.g. channel count)
)

DefectIssue = Literal[
    "not_found",
    "permission_denied",
    "empty_file",
    "truncated",
    "format_mismatch",
    "unsupported_format",
    "too_many_pixels",
    "no_image_data",
    "decode_error",
    "bad_shape",
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


@dataclass(frozen=True)
class ReadPolicy:
    """How readers treat the awkward cases. Travels in the bundle's preprocessing block.

    Attributes:
        max_pixels: refuse images with more pixels (height*width) than this (decompression bombs).
        multipage: ``"first"`` keeps the first page/plane of a multi-page TIFF,
            ``"channels"`` stacks pages as channels (they must share one shape).
        nonfinite_fill: value that replaces NaN/+Inf/-Inf in float data (counted in metadata).
        jpeg_draft_size: when set (h, w), JPEGs may be decoded at a reduced scale that is still
            at least this size (PIL draft mode); ``None`` decodes at full size.
    """

    max_pixels: int = 100_000_000
    multipage: Literal["first", "channels"] = "first"
    nonfinite_fill: float = 0.0
    jpeg_draft_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ConfigError("max_pixels must be positive (--max-pixels)")
        if self.multipage not in ("first", "channels"):
            raise ConfigError("multipage must be 'first' or 'channels' (--multipage)")


@dataclass(frozen=True)
class ImageRecord:
    """A decoded image in its native dtype, with what was learned while reading it.

    ``array`` is ``(H, W)`` for one channel or ``(H, W, C)`` for several, in the file's own dtype
    (uint8, uint16, int16, int32, float32, float64 ...). ``meta`` always holds ``format``
    (``"jpeg"``, ``"png"``, ``"tiff"``, ``"fits"`` ...), ``dtype``, ``shape``, ``channels``,
    ``nonfinite`` (count of replaced NaN/Inf values) and ``degenerate`` (True for a constant image);
    FITS adds ``header`` (card name -> value) and ``hdu``; photos add ``mode`` and
    ``exif_orientation``; readers note every conversion rule they applied in ``conversions``.
    """

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
