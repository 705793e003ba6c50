"""Turn a classify request body into named image bytes, or refuse it with a problem.

Two encodings are accepted: ``multipart/form-data`` (every part with a filename is an image;
other fields are ignored) and ``application/json`` ``{"images": ["<base64>", ...],
"names": [...]}`` (names optional; ``data:image/...;base64,`` prefixes allowed). Bytes are
collected while the body streams in, under the request-size limit of :mod:`.limits`.

The format of each image is decided from its bytes before it is queued for inference: bytes of
no known image format, or of a format this server does not accept, become a per-image defect
at once, with the same ``{path, issue, message}`` the io layer gives. A JSON item that is not
valid base64 is a per-image ``bad_base64`` defect in its place too: one bad item never costs
the other images of the request their answers.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from imgtriage.errors import require
from imgtriage.serve.config import ServeConfig
from imgtriage.serve.limits import iter_body, load_json_limited, too_large
from imgtriage.serve.problems import Problem

MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class Upload:
    """One image as sent: the client's name for it (a label, never a server path) and bytes.

    ``defect`` is set when the item carried no usable bytes (invalid base64): it is answered
    with that ``{path, issue, message}`` and never decoded.
    """

    name: str
    data: bytes
    defect: dict[str, str] | None = None


def bad_request(detail: str, slug: str = "bad-request", title: str = "Bad request") -> Problem:
    return Problem(400, slug, title, detail)


def clean_name(raw: str | None, index: int) -> str:
    """The last component of a client's file name, printable and bounded; else image[i]."""
    name = PurePosixPath((raw or "").replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable())[:MAX_NAME_CHARS]
    return name or f"image[{index}]"


async def read_uploads(request: Any, cfg: ServeConfig) -> list[Upload]:
    """The images of a classify request, checked against the count limits."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        uploads = await _read_multipart(request, ctype, cfg)
    elif media == "application/json" or media.endswith("+json"):
        uploads = await _read_json(request, cfg)
    else:
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      f"send images as multipart/form-data file parts or as JSON "
                      f"{{\"images\": [base64, ...]}}, not {media or 'a body without a type'!r}")
    if not uploads:
        raise Problem(422, "no-images", "No images",
                      "the request holds no image: add file parts (multipart) or a non-empty "
                      "\"images\" list (JSON)")
    return uploads


def _too_many(count: int, cfg: ServeConfig) -> Problem:
    return too_large(f"{count} images in one request; this server takes at most "
                     f"{cfg.max_images} (--max-images): split the request")


class _MultipartCollector:
    """python-multipart callbacks that keep file parts in memory (the body limit bounds it)."""

    def __init__(self, max_images: int, cfg: ServeConfig) -> None:
        self.max_images, self.cfg = max_images, cfg
        self.uploads: list[Upload] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._chunks: list[bytes] | None = None
        self._filename: str | None = None

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _part_begin(self) -> None:
        self._headers, self._chunks, self._filename = {}, None, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"filename" not in options:
            return  # a plain form field: ignored (its bytes still count toward the limit)
        if len(self.uploads) >= self.max_images:
            raise _too_many(len(self.uploads) + 1, self.cfg)
        self._filename = options[b"filename"].decode("utf-8", "replace")
        self._chunks = []

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is not None:
            self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._chunks is not None:
            name = clean_name(self._filename, len(self.uploads))
            self.uploads.append(Upload(name, b"".join(self._chunks)))
        self._chunks = None

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(request: Any, ctype: str, cfg: ServeConfig) -> list[Upload]:
    pm = require("python_multipart", "serve")
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(ctype)
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("multipart/form-data without a boundary parameter")
    collector = _MultipartCollector(cfg.max_images, cfg)
    try:
        parser = pm.MultipartParser(boundary, collector.callbacks())
        async for chunk in iter_body(request, cfg.max_request_bytes, cfg.body_timeout_s,
                                     cfg.body_deadline_s):
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise bad_request(f"the multipart body is malformed: {exc}",
                          "bad-multipart", "Malformed multipart body") from None
    if not collector.ended:
        raise bad_request("the multipart body ended before its closing boundary (truncated "
                          "upload?)", "bad-multipart", "Malformed multipart body")
    return collector.uploads


async def _read_json(request: Any, cfg: ServeConfig) -> list[Upload]:
    chunks = [c async for c in iter_body(request, cfg.max_request_bytes, cfg.body_timeout_s,
                                         cfg.body_deadline_s)]
    try:
        doc = load_json_limited(b"".join(chunks))
    except ValueError as exc:  # bad JSON, bad UTF-8, too deep, absurd numbers
        raise bad_request(f"the body is not usable JSON: {exc}", "bad-json",
                          "Invalid JSON") from None
    images, names = _json_fields(doc)
    if len(images) > cfg.max_images:
        raise _too_many(len(images), cfg)
    return [_json_upload(clean_name(names[i] if names else None, i), s, i)
            for i, s in enumerate(images)]


def _json_upload(name: str, text: str, index: int) -> Upload:
    """One JSON item: its bytes, or a ``bad_base64`` defect in its place (naming the index)."""
    from imgtriage.io import Defect

    try:
        return Upload(name, decode_base64(text, f"images[{index}]"))
    except Problem as exc:
        return Upload(name, b"", Defect(name, "bad_base64", exc.detail).to_dict())


def _json_fields(doc: Any) -> tuple[list[str], list[str] | None]:
    def invalid(detail: str) -> Problem:
        return Problem(422, "invalid-body", "Invalid request body", detail)

    if not isinstance(doc, dict) or "images" not in doc:
        raise invalid('expected a JSON object {"images": ["<base64>", ...]}')
    extra = sorted(set(doc) - {"images", "names"})
    if extra:
        raise invalid(f"unknown keys {extra}; the body takes \"images\" and optional \"names\" "
                      "(options go in the query string)")
    images, names = doc["images"], doc.get("names")
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise invalid('"images" must be a list of base64 strings')
    if names is not None and (not isinstance(names, list) or len(names) != len(images)
                              or not all(isinstance(n, str) for n in names)):
        raise invalid('"names" must be a list of strings, one per image')
    return images, names


def decode_base64(text: str, where: str) -> bytes:
    """File bytes from standard base64 or a ``data:...;base64,`` URL (400 naming ``where``)."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad_request(f"{where} is a data URL without ';base64,'",
                              "bad-base64", "Invalid base64")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{where} is not valid base64 ({exc}); encode the file's "
                          "bytes with standard base64 (RFC 4648, with padding)",
                          "bad-base64", "Invalid base64") from None


def precheck(upload: Upload, cfg: ServeConfig) -> dict[str, str] | None:
    """A defect dict for bytes that are no accepted image format, else None (go on)."""
    from imgtriage.io import Defect, sniff_format, try_read_image

    if upload.defect is not None:
        return upload.defect
    fmt = sniff_format(upload.data[:64])
    if fmt is None or not upload.data:
        out = try_read_image(upload.data, name=upload.name)  # fails at the sniff: cheap
        return out.to_dict() if isinstance(out, Defect) else None
    fmt = "fits" if fmt in ("gzip", "bzip2") else fmt
    if fmt not in cfg.allowed_formats:
        return Defect(upload.name, "unsupported_format",
                      f"'{upload.name}' is {fmt.upper()} data, which this server does not "
                      f"accept; it takes {', '.join(cfg.allowed_formats)} "
                      "(--allowed-formats)").to_dict()
    return None
