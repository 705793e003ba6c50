"""Optional API keys: ``Authorization: Bearer <token>`` checked in constant time.

The key file holds one token per line (blank lines and ``#`` comments ignored). Tokens are kept
only as sha256 digests and every digest is compared with :func:`hmac.compare_digest`, so the
time a check takes says nothing about how much of a token was right, nor which key matched.

Example:
    >>> auth = ApiKeyAuth.from_tokens(["s3cret"])
    >>> auth.accepts("Bearer s3cret"), auth.accepts("Bearer guess"), auth.accepts(None)
    (True, False, False)
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError
from imgtriage.serve.limits import bearer_token
from imgtriage.serve.problems import Problem

MIN_TOKEN_CHARS = 8


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class ApiKeyAuth:
    """Accepted bearer tokens (as digests); no tokens means no authentication."""

    def __init__(self, digests: tuple[bytes, ...] = ()) -> None:
        self._digests = digests

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @classmethod
    def from_tokens(cls, tokens: list[str]) -> ApiKeyAuth:
        return cls(tuple(_digest(t) for t in tokens))

    @classmethod
    def from_file(cls, path: str | None) -> ApiKeyAuth:
        """Read the key file; a missing, empty or malformed one stops the server at start."""
        if path is None:
            return cls()
        p = Path(path)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API key file {p}: {exc} (--api-key-file)") \
                from None
        tokens = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not tokens:
            raise ConfigError(f"the API key file {p} holds no key; put one token per line "
                              "(--api-key-file)")
        for n, tok in enumerate(tokens, 1):
            if len(tok) < MIN_TOKEN_CHARS or any(c.isspace() or not c.isprintable()
                                                 for c in tok):
                raise ConfigError(f"key {n} in {p} must be at least {MIN_TOKEN_CHARS} printable "
                                  "characters without spaces (--api-key-file)")
        return cls.from_tokens(tokens)

    def accepts(self, authorization: str | None) -> bool:
        if not self._digests:
            return True
        token = bearer_token(authorization)
        if token is None:
            return False
        digest = _digest(token)
        matched = False
        for known in self._digests:  # no early exit: every key costs the same
            matched |= hmac.compare_digest(digest, known)
        return matched

    def check(self, request: Any) -> None:
        """Raise a 401 problem unless the request carries an accepted bearer token."""
        header = request.headers.get("authorization")
        if self.accepts(header):
            return
        detail = ("send 'Authorization: Bearer <key>' with a key from the server's "
                  "--api-key-file" if not header else "the bearer token is not an accepted key")
        raise Problem(401, "unauthorized", "Unauthorized", detail,
                      headers={"WWW-Authenticate": 'Bearer realm="imgtriage"'})
