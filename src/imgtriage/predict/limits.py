"""A predictor with another decode budget: what ``--max-pixels``, ``--max-decoded-bytes``,
``--max-pages`` and ``--decode-timeout`` change for one run or one service.

The budget travels in the bundle (``preprocess.read``); a deployment may set its own. The
caller's predictor is never changed: a shallow copy (sharing the loaded model) gets the new
read policy.
"""

from __future__ import annotations

from typing import Any

from imgtriage.predict.base import BasePredictor

LIMIT_FIELDS = ("max_pixels", "max_decoded_bytes", "max_pages", "decode_timeout_s")


def with_read_limits(predictor: BasePredictor, *, tighten_only: bool = False,
                     **limits: Any) -> BasePredictor:
    """``predictor`` reading with ``limits`` (None values keep the bundle's).

    ``tighten_only`` keeps the bundle's value wherever it is already lower (a service never
    loosens what a bundle asks for). Returns the predictor itself when nothing changes.

    Example:
        >>> p2 = with_read_limits(p, max_decoded_bytes=32 * 2**20)  # doctest: +SKIP
    """
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise TypeError(f"unknown read limits {sorted(unknown)}; use {LIMIT_FIELDS}")
    read = predictor.spec.read
    changes = {}
    for key, value in limits.items():
        if value is None:
            continue
        current = getattr(read, key)
        if tighten_only and current <= value:
            continue
        if value != current:
            changes[key] = value
    if not changes:
        return predictor
    return predictor.with_read_policy(**changes)
