"""A dependency-free client for `imgtriage serve`: what a web backend would call.

Two ways to send photos to ``POST /v1/classify``, standard library only:

- ``classify_json``: ``{"images": [<base64>...], "names": [...]}`` (what a backend that already
  holds the bytes in memory sends);
- ``classify_multipart``: ``multipart/form-data`` file parts (what a browser form, and the
  service's own web page, send).

Both return the service's JSON answer: ``{"model", "options", "num_results", "num_defects",
"results": [one entry per image, in order]}``; an entry is a result row ``{path, class,
class_id, score, abstained, [probs]}`` or a defect ``{path, issue, message}``.

Usage::

    python examples/web-photos/photo_client.py http://127.0.0.1:8000 a.jpg b.png
    python examples/web-photos/photo_client.py http://127.0.0.1:8000 a.jpg --multipart
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ServiceError(RuntimeError):
    """The service answered with an error status; ``problem`` is its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {problem.get('title')}: {problem.get('detail')}")
        self.status, self.problem = status, problem


def _url(base: str, include_probs: bool, profile: str | None) -> str:
    query = {"include_probs": "true"} if include_probs else {}
    if profile:
        query["profile"] = profile
    return base.rstrip("/") + "/v1/classify" + ("?" + urllib.parse.urlencode(query)
                                                  if query else "")


def _post(url: str, body: bytes, content_type: str, timeout: float,
          api_key: str | None) -> dict[str, Any]:
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read())
        except ValueError:
            problem = {"title": exc.reason, "detail": ""}
        raise ServiceError(exc.code, problem) from None


def classify_json(base_url: str, images: Sequence[bytes], names: Sequence[str], *,
                  include_probs: bool = False, profile: str | None = None,
                  timeout: float = 60.0, api_key: str | None = None) -> dict[str, Any]:
    """Send the images as base64 strings in one JSON body."""
    body = json.dumps({"images": [base64.b64encode(b).decode("ascii") for b in images],
                       "names": list(names)}).encode()
    return _post(_url(base_url, include_probs, profile), body, "application/json", timeout,
                 api_key)


def multipart_body(images: Sequence[bytes], names: Sequence[str]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one ``files`` part per image, and its type."""
    boundary = "imgtriage-" + secrets.token_hex(12)
    parts = []
    for data, name in zip(images, names, strict=True):
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        safe = name.replace('"', "%22").replace("\r", "").replace("\n", "")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
                     f'filename="{safe}"\r\nContent-Type: {ctype}\r\n\r\n'.encode() + data
                     + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def classify_multipart(base_url: str, images: Sequence[bytes], names: Sequence[str], *,
                       include_probs: bool = False, profile: str | None = None,
                       timeout: float = 60.0, api_key: str | None = None) -> dict[str, Any]:
    """Send the images as multipart file parts, like a browser form."""
    body, ctype = multipart_body(images, names)
    return _post(_url(base_url, include_probs, profile), body, ctype, timeout, api_key)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="base URL of the service, e.g. http://127.0.0.1:8000")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--multipart", action="store_true", help="send file parts, not base64 JSON")
    ap.add_argument("--probs", action="store_true", help="ask for every class probability")
    ap.add_argument("--profile", help="a decision profile saved in the bundle")
    args = ap.parse_args(argv)
    send = classify_multipart if args.multipart else classify_json
    try:
        answer = send(args.url, [p.read_bytes() for p in args.files],
                      [p.name for p in args.files], include_probs=args.probs,
                      profile=args.profile)
    except ServiceError as exc:
        print(json.dumps(exc.problem, indent=2), file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
