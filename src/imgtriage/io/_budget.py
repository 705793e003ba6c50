"""The decode budget: refuse a file from its headers before its pixels are allocated.

Every reader calls these checks with what the header says (shape, bytes per sample, pages),
before asking its decoder for the pixels, and :func:`check_time` between its steps. A file
over budget raises ``ReadFailure`` with ``too_large``, ``too_many_pages`` or
``decode_timeout``; the dispatcher turns it into a :class:`~imgtriage.io.Defect`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from imgtriage.io._source import ReadFailure, Source
from imgtriage.io._types import ReadPolicy


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_bytes(src: Source, what: str, dims: Iterable[int], itemsize: int,
                policy: ReadPolicy, *, plane_pixels: int = 0) -> int:
    """Refuse when ``prod(dims) * itemsize`` decoded bytes exceed ``policy.max_decoded_bytes``.

    ``plane_pixels`` (height x width of the image) counts the float32 plane preprocessing
    works in as well: the larger of the two is checked, so an 8-bit image, which grows four
    times once it is floats, is held to the same memory as a float one. ``what`` describes
    the data for the message (e.g. "a 10000x10000 RGBA page"). Returns the byte count.
    """
    decoded = math.prod(int(d) for d in dims) * int(itemsize)
    working = int(plane_pixels) * 4
    nbytes = max(decoded, working)
    if nbytes > policy.max_decoded_bytes:
        counted = " (one float32 plane of it, as preprocessing works)" if working > decoded \
            else ""
        raise ReadFailure(
            "too_large",
            f"'{src.display}' holds {what} that would take {_mib(nbytes)} once decoded"
            f"{counted}, over the decode budget of {_mib(policy.max_decoded_bytes)} "
            "(ReadPolicy.max_decoded_bytes); downscale or crop the file, or raise the budget "
            "(--max-decoded-bytes)",
        )
    return decoded


def check_pages(src: Source, count: int, what: str, policy: ReadPolicy) -> None:
    """Refuse when the file needs more than ``policy.max_pages`` pages/planes/HDUs."""
    if count > policy.max_pages:
        raise ReadFailure(
            "too_many_pages",
            f"'{src.display}' needs {count} {what} read, over the limit of {policy.max_pages} "
            "(ReadPolicy.max_pages); split the file, read only its first page "
            "(--multipage first), or raise the limit (--max-pages)",
        )


def check_time(src: Source, policy: ReadPolicy, step: str) -> None:
    """Refuse when decoding has run past ``policy.decode_timeout_s``; ``step`` names where."""
    elapsed = src.elapsed()
    if elapsed > policy.decode_timeout_s:
        raise ReadFailure("decode_timeout", timeout_message(src.display, elapsed, policy, step))


def timeout_message(display: str, elapsed: float, policy: ReadPolicy, step: str) -> str:
    """The ``decode_timeout`` message (also used by callers that stop waiting for a decode)."""
    return (
        f"'{display}' took {elapsed:.1f} s to decode ({step}), over the limit of "
        f"{policy.decode_timeout_s:g} s (ReadPolicy.decode_timeout_s); the file is "
        "unusually slow to decode (many pages, scans or chunks): re-export it, or raise "
        "the limit (--decode-timeout)"
    )
