"""Limits that protect the service from what clients send: body size and pace, open requests.

The body is read chunk by chunk: a declared ``Content-Length`` over the limit is refused before
a byte is read, and an undeclared (chunked) body is refused as soon as its running total passes
the limit, so a client can never make the server buffer more than ``--max-request-bytes``.
A client that stops sending mid-body gets 408 after ``--body-timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from imgtriage.serve.problems import Problem


def too_large(detail: str) -> Problem:
    return Problem(413, "request-too-large", "Request too large", detail)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def declared_length(request: Any, max_bytes: int) -> int | None:
    """The Content-Length header checked against the limit (None when absent)."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    try:
        length = int(raw)
    except ValueError:
        raise Problem(400, "bad-request", "Bad request",
                      f"Content-Length {raw[:40]!r} is not a number") from None
    if length < 0:
        raise Problem(400, "bad-request", "Bad request", "Content-Length is negative")
    if length > max_bytes:
        raise too_large(f"the request body is {_mib(length)}; this server accepts at most "
                        f"{_mib(max_bytes)} per request (--max-request-bytes): send fewer or "
                        "smaller images per request")
    return length


async def iter_body(request: Any, max_bytes: int, chunk_timeout: float) -> AsyncIterator[bytes]:
    """Yield the body's chunks; 413 past ``max_bytes``, 408 when a chunk is slower than
    ``chunk_timeout`` seconds, 400 when the client goes away mid-body."""
    declared_length(request, max_bytes)
    total = 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), chunk_timeout)
        except TimeoutError:
            raise Problem(408, "body-timeout", "Request timeout",
                          f"no request data arrived for {chunk_timeout:g} s "
                          "(--body-timeout); send the whole body without pausing") from None
        if message["type"] == "http.disconnect":
            raise Problem(400, "client-disconnected", "Client disconnected",
                          "the client closed the connection before the body was complete")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > max_bytes:
            raise too_large(f"the request body passed {_mib(max_bytes)}, the most this server "
                            "accepts per request (--max-request-bytes)")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class ClientLimiter:
    """At most ``limit`` classify requests open per client; the next one gets 429.

    A client is its API key when keys are configured (hashed, never kept in clear), else its
    address; behind a reverse proxy every client has the proxy's address, so set a key per
    client there or raise ``--max-client-inflight``. Used on the event loop only: no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    @staticmethod
    def client_id(request: Any, keyed: bool) -> str:
        """``keyed``: API keys are configured (and this request's key was accepted). Without
        keys an Authorization header proves nothing, so it never names the client: a
        made-up header per request must not buy another ``limit`` requests."""
        auth = request.headers.get("authorization") if keyed else None
        if auth:
            return "key:" + hashlib.sha256(auth.encode("utf-8", "replace")).hexdigest()[:16]
        return "addr:" + (request.client.host if request.client else "unknown")

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        if self._open[client] >= self.limit:
            raise Problem(429, "too-many-requests", "Too many requests",
                          f"this client already has {self.limit} classify requests open "
                          "(--max-client-inflight); wait for answers before sending more",
                          headers={"Retry-After": "1"})
        self._open[client] += 1
        try:
            yield
        finally:
            self._open[client] -= 1
            if self._open[client] <= 0:
                del self._open[client]
