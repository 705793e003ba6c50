"""FITS header helpers: cards to a JSON-ready dict, and a primary header that lost its END card.

A header whose END card was dropped (a known failure of some acquisition software) makes
astropy read the pixel data as more header cards even with ``ignore_missing_end``. The header
is made of 80-character printable cards, so where the cards stop the data begins:
:func:`restore_end_card` puts the END card back there.
"""

from __future__ import annotations

import math
import re
from typing import Any, BinaryIO

BLOCK = 2880
CARD = 80
_END_CARD = b"END" + b" " * 77
_KEYWORD_RE = re.compile(rb"^[A-Za-z0-9_\-]* *$")
_JOINED_KEYWORDS = ("COMMENT", "HISTORY")


def header_dict(header: Any) -> dict[str, Any]:
    """Card keyword -> value, JSON-serialisable; COMMENT and HISTORY cards joined by newlines.

    Example:
        >>> from astropy.io import fits
        >>> h = fits.Header([("EXPTIME", 30.0), ("FILTER", "V")]); h.add_history("bias")
        >>> header_dict(h)
        {'EXPTIME': 30.0, 'FILTER': 'V', 'HISTORY': 'bias'}
    """
    out: dict[str, Any] = {}
    joined: dict[str, list[str]] = {}
    for card in header.cards:
        try:
            keyword, value = str(card.keyword), card.value
        except Exception:  # a malformed card: keep its raw text rather than drop it
            keyword, value = _raw_card(card)
        if not keyword:
            continue
        if keyword in _JOINED_KEYWORDS:
            joined.setdefault(keyword, []).append(str(value))
        elif keyword not in out:
            out[keyword] = _json_value(value)
    out.update({key: "\n".join(lines) for key, lines in joined.items()})
    return out


def _raw_card(card: Any) -> tuple[str, str]:
    try:
        image = str(card.image)
    except Exception:
        return "", ""
    return image[:8].strip(), image[10:].strip()


def _json_value(value: Any) -> Any:
    """str/int/float/bool as they are; undefined -> None; NaN, Inf and the rest -> str."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or type(value).__name__ == "Undefined":
        return None
    return str(value)


def _is_card(chunk: bytes) -> bool:
    """Could these 80 bytes be a header card? A legal keyword field and no control bytes.

    Non-ASCII text (latin-1 comments, sadly common) is tolerated; pixel data almost always
    holds a byte below 0x20 within 80 bytes.
    """
    if len(chunk) != CARD or any(byte < 0x20 or byte == 0x7F for byte in chunk):
        return False
    return bool(_KEYWORD_RE.match(chunk[:8]))


def restore_end_card(stream: BinaryIO) -> bytes | None:
    """The whole FITS file with its primary END card put back, or None when it has one.

    Reads the header card by card; returns None as soon as an END card appears (nothing
    to repair), or when the cards never stop (a header-only file astropy reads as it is).
    """
    cards: list[bytes] = []
    while True:
        chunk = stream.read(CARD)
        if not chunk:
            return None
        if chunk[:8] == b"END     ":
            return None
        if not _is_card(chunk):
            break
        cards.append(chunk)
    while cards and not cards[-1].strip():
        cards.pop()  # blank padding cards before the data
    header = b"".join(cards) + _END_CARD
    header += b" " * (-len(header) % BLOCK)
    return header + chunk + stream.read()
