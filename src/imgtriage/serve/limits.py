"""Limits that protect the service from what clients send: body size and pace, open requests.

The body is read chunk by chunk: a declared ``Content-Length`` over the limit is refused before
a byte is read, and an undeclared (chunked) body is refused as soon as its running total passes
the limit, so a client can never make the server buffer more than ``--max-request-bytes``.
A client that stops sending mid-body gets 408 after ``--body-timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
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


async def iter_body(request: Any, max_bytes: int, chunk_timeout: float,
                    deadline_s: float | None = None) -> AsyncIterator[bytes]:
    """Yield the body's chunks; 413 past ``max_bytes``, 408 when a chunk is slower than
    ``chunk_timeout`` seconds or the whole body takes longer than ``deadline_s`` (a client
    trickling a byte at a time), 400 when the client goes away mid-body."""
    declared_length(request, max_bytes)
    total = 0
    loop = asyncio.get_running_loop()
    end = None if deadline_s is None else loop.time() + deadline_s
    while True:
        wait = chunk_timeout if end is None else min(chunk_timeout, end - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(request.receive(), wait)
        except TimeoutError:
            if end is not None and loop.time() >= end - 1e-3:
                raise Problem(408, "body-deadline", "Request timeout",
                              f"the request body took longer than {deadline_s:g} s in all "
                              "(--body-deadline); send it at a steady pace, or send less "
                              "per request") from None
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


MAX_JSON_DEPTH = 8
MAX_JSON_DIGITS = 100


def _json_int(text: str) -> int:
    if len(text) > MAX_JSON_DIGITS:
        raise ValueError(f"it holds a {len(text)}-digit number; numbers in a request body "
                         f"have at most {MAX_JSON_DIGITS} digits")
    return int(text)


def _json_float(text: str) -> float:
    if len(text) > MAX_JSON_DIGITS:
        raise ValueError(f"it holds a {len(text)}-character number; numbers in a request "
                         f"body have at most {MAX_JSON_DIGITS} characters")
    return float(text)


def load_json_limited(raw: bytes) -> Any:
    """``json.loads`` for request bodies, with limits: nesting depth, number length.

    Raises ``ValueError`` (``JSONDecodeError`` and ``UnicodeDecodeError`` are ones) with a
    message for the client; nothing a body holds can raise anything else out of here.
    """
    try:
        doc = json.loads(raw, parse_int=_json_int, parse_float=_json_float)
    except RecursionError:
        raise ValueError(f"it is nested too deeply (a request body nests at most "
                         f"{MAX_JSON_DEPTH} arrays/objects)") from None
    stack = [(doc, 1)]
    while stack:  # iterative: a depth check must not recurse
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"it nests arrays/objects {depth} deep; a request body "
                                 f"nests at most {MAX_JSON_DEPTH}")
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items if isinstance(v, dict | list))
    return doc


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, whatever the scheme's case
    and the spaces around (``bearer  tok`` and ``Bearer tok`` are the same token)."""
    parts = (authorization or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1].strip()
    return token or None


def normal_address(host: str) -> str:
    """One spelling per address: ``::ffff:10.0.0.1`` is ``10.0.0.1``, IPv6 compressed."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


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
        token = bearer_token(request.headers.get("authorization")) if keyed else None
        if token:  # the credential itself, not how the header spelled it
            return "key:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]
        return "addr:" + normal_address(request.client.host if request.client else "unknown")

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


# Query parameters that look like credentials: a URL ends up in access logs, proxies and
# browser history, so a request carrying one is refused before anything logs it.
SECRET_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token",
                           "auth", "authorization", "bearer", "password", "secret"})


class SecretQueryGuard:
    """Plain ASGI middleware: refuse (400) a request whose query string holds a credential.

    The query string is blanked in the request scope first, so the access log (which uvicorn
    writes from the same scope when the answer goes out) never shows the secret.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        from urllib.parse import parse_qsl

        raw = scope["query_string"].decode("latin-1")
        names = {k.strip().lower() for k, _ in parse_qsl(raw, keep_blank_values=True)}
        leaked = sorted(names & SECRET_PARAMS)
        if not leaked:
            await self.app(scope, receive, send)
            return
        scope["query_string"] = b"redacted"
        body = json.dumps(Problem(
            400, "credential-in-url", "Credential in the URL",
            f"the query string holds {', '.join(leaked)}: credentials never go in a URL "
            "(it is logged and cached); send the key as 'Authorization: Bearer <key>'").body())
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/problem+json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})
