"""The resolved service configuration: every limit of ``imgtriage serve`` in one frozen record.

Errors name the CLI flag that sets the value. The record travels to uvicorn worker processes
as JSON in an environment variable (``to_env`` / ``from_env``), so that ``--workers N`` starts
N processes that each load the same bundle with the same limits.

Example:
    >>> cfg = ServeConfig(bundle="runs/digits/bundle", max_batch_size=8)
    >>> cfg.max_wait_ms, cfg.max_images
    (50.0, 32)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from imgtriage.errors import ConfigError

ENV_VAR = "IMGTRIAGE_SERVE_CONFIG"

# What a sniffed upload may be; gzip/bzip2 streams count as FITS (the io layer checks inside).
KNOWN_FORMATS = ("jpeg", "png", "bmp", "webp", "gif", "tiff", "fits")
BACKENDS = ("auto", "torch", "onnx")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``imgtriage serve`` can be told.

    Attributes:
        bundle: the bundle directory or .zip to serve.
        host, port, workers: where uvicorn listens and how many processes it starts.
        threads: compute threads per worker (default: CPU cores / workers).
        backend: auto | torch | onnx (see ``Predictor.load``).
        precision: fp32 | int8 ONNX graph; None = the bundle's (int8 only where accepted).
        max_batch_size: images merged into one inference call.
        max_wait_ms: how long the model may stay idle waiting for images known to be on their
            way (a request still uploading, or the next requests of the clients the previous
            batch answered) before it runs what is queued; a full batch goes at once and a lone
            client never waits.
        max_queue: images waiting for inference before new requests get 503 + Retry-After.
        max_request_bytes: request body limit, enforced while the body streams in (413).
        max_images: images per request (413 above it).
        max_pixels: pixels per image (height*width); larger ones are ``too_many_pixels``.
        allowed_formats: formats accepted, decided from the bytes (others: 415).
        request_timeout_s: how long a request may wait for its inference (503 after).
        body_timeout_s: how long the server waits for the next piece of a body (408 after).
        body_deadline_s: how long a whole request body may take to arrive (408 after): a
            client trickling a byte every few seconds cannot hold a request open.
        max_decoded_bytes, max_pages, decode_timeout_s: the decode budget per image (see
            ``imgtriage.io.ReadPolicy``; a bundle's lower values are kept): over it an image
            is a ``too_large``, ``too_many_pages`` or ``decode_timeout`` defect (422), and a
            decode thread busy past ``decode_timeout_s`` counts as stuck; with every decode
            thread stuck the service is not ready (503 on /readyz and /v1/classify).
        expect_sha256: refuse to serve any bundle but the one with this sha256.
        max_client_inflight: classify requests one client (API key or address) may have
            open at once (429 above it).
        api_key_file: file with one accepted bearer token per line; None = no auth.
        cors_origins: origins allowed by CORS; empty = CORS off.
        log_level: uvicorn's log level; access_log: one log line per request.
        root_path: the path prefix a reverse proxy serves the app under (e.g. ``/imgtriage``).
        legacy_classify: also answer ``POST /classify {"image": "<base64>"}`` with one flat
            result, for clients of the old Flask backend (see ``serve.compat``).
    """

    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int | None = None
    backend: str = "auto"
    precision: str | None = None
    max_batch_size: int = 16
    max_wait_ms: float = 50.0
    max_queue: int = 256
    max_request_bytes: int = 16 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = KNOWN_FORMATS
    request_timeout_s: float = 30.0
    body_timeout_s: float = 15.0
    body_deadline_s: float = 60.0
    max_decoded_bytes: int = 64 * 2**20
    max_pages: int = 64
    decode_timeout_s: float = 5.0
    expect_sha256: str | None = None
    max_client_inflight: int = 32
    api_key_file: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    access_log: bool = True
    root_path: str = ""
    legacy_classify: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bundle", os.fspath(self.bundle))
        object.__setattr__(self, "allowed_formats", tuple(self.allowed_formats))
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        _positive_ints(self, {"port": "--port", "workers": "--workers",
                              "max_batch_size": "--max-batch-size", "max_queue": "--max-queue",
                              "max_request_bytes": "--max-request-bytes",
                              "max_images": "--max-images", "max_pixels": "--max-pixels",
                              "max_decoded_bytes": "--max-decoded-bytes",
                              "max_pages": "--max-pages",
                              "max_client_inflight": "--max-client-inflight"})
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port} (--port)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads} (--threads)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r} "
                              "(--backend)")
        if self.precision not in (None, "fp32", "int8"):
            raise ConfigError(f"precision must be fp32 or int8, got {self.precision!r} "
                              "(--precision)")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError(f"max wait must be 0..1000 ms, got {self.max_wait_ms} "
                              "(--max-wait-ms)")
        if self.max_queue < self.max_images:
            raise ConfigError(f"the queue ({self.max_queue} images) must hold at least one "
                              f"full request ({self.max_images} images) (--max-queue)")
        for name, flag in (("request_timeout_s", "--request-timeout"),
                           ("body_timeout_s", "--body-timeout"),
                           ("body_deadline_s", "--body-deadline"),
                           ("decode_timeout_s", "--decode-timeout")):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag.lstrip('-').replace('-', ' ')} must be > 0 seconds, "
                                  f"got {getattr(self, name)} ({flag})")
        bad = sorted(set(self.allowed_formats) - set(KNOWN_FORMATS))
        if bad or not self.allowed_formats:
            raise ConfigError(f"allowed formats must be a non-empty subset of {KNOWN_FORMATS}, "
                              f"got {list(self.allowed_formats)} (--allowed-formats)")
        if any(not o or o.endswith("/") for o in self.cors_origins):
            raise ConfigError("CORS origins look like https://app.example.org (scheme and "
                              "host, no trailing slash) (--cors-origin)")
        if self.root_path and (not self.root_path.startswith("/")
                               or self.root_path.endswith("/")):
            raise ConfigError(f"root path must look like /prefix, got {self.root_path!r} "
                              "(--root-path)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"unknown log level {self.log_level!r} (--log-level)")

    @property
    def compute_threads(self) -> int:
        """Threads for the model in each worker: the cores shared out among the workers."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_env(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown serve settings {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeConfig:
        """The config ``imgtriage serve`` left for its worker processes."""
        raw = (environ if environ is not None else os.environ).get(ENV_VAR)
        if not raw:
            raise ConfigError(f"{ENV_VAR} is not set; start the service with `imgtriage serve "
                              "BUNDLE` (it passes the settings to every worker)")
        return cls.from_dict(json.loads(raw))


def _positive_ints(cfg: ServeConfig, names: dict[str, str]) -> None:
    for name, flag in names.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag.lstrip('-').replace('-', ' ')} must be a positive "
                              f"integer, got {value!r} ({flag})")
