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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from imgtriage.errors import ConfigError

ENV_VAR = "IMGTRIAGE_SERVE_CONFIG"

# What a sniffed upload may be; gzip/bzip2 streams count as FITS (the io layer checks inside).
KNOWN_FORMATS = ("jpeg", "png", "bmp", "webp", "gif", "tiff", "fits")
BACKENDS = ("auto", "torch", "onnx")


def _f(default: Any, help: str, *, flag: str | None = None, repeat: bool = False) -> Any:
    """A field with its ``imgtriage serve`` option: help text, and the flag where it is not
    ``--field-name`` (``cli/_options.py`` builds the command from these)."""
    meta = {"help": help, "flag": flag, "repeat": repeat}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``imgtriage serve`` can be told; one option per field (its help text is the
    field's ``metadata["help"]``). ``bundle`` is the bundle directory or .zip to serve.

    ``max_wait_ms`` bounds how long the model may stay idle waiting for images known to be on
    their way (a request still uploading, or the next requests of the clients the previous
    batch answered); a full batch goes at once and a lone client never waits. The decode
    budget (``max_decoded_bytes``, ``max_pages``, ``decode_timeout_s``; see
    ``imgtriage.io.ReadPolicy``, a bundle's lower values are kept) makes an image over it a
    ``too_large``, ``too_many_pages`` or ``decode_timeout`` defect (422); a decode thread busy
    past ``decode_timeout_s`` counts as stuck, and with every one stuck the service is not
    ready. ``legacy_classify`` serves the old Flask backend's route (see ``serve.compat``).
    """

    bundle: str
    host: str = _f("127.0.0.1", "Address to listen on (0.0.0.0 for all).")
    port: int = _f(8000, "TCP port.")
    workers: int = _f(1, "Worker processes; each loads the model once.")
    threads: int | None = _f(None, "Compute threads per worker (default: CPU cores / "
                                   "workers).")
    backend: str = _f("auto", "auto (ONNX Runtime when the bundle has a graph), torch or onnx.")
    precision: str | None = _f(None, "fp32 or int8 ONNX graph (default: the bundle's: int8 "
                                     "only where its check accepted it).")
    max_batch_size: int = _f(16, "Most images merged into one inference call.")
    max_wait_ms: float = _f(50.0, "How long the model may idle waiting for requests known to "
                                  "be on their way (a lone client never waits).")
    max_queue: int = _f(256, "Images waiting for inference before 503.")
    max_request_bytes: int = _f(16 * 1024 * 1024, "Request body limit (413).")
    max_images: int = _f(32, "Images per request (413 above).")
    max_pixels: int = _f(40_000_000, "Pixels per image; larger images are refused as "
                                     "too_many_pixels.")
    allowed_formats: tuple[str, ...] = _f(KNOWN_FORMATS, "Comma-separated formats accepted "
                                                         "(checked from the bytes).")
    request_timeout_s: float = _f(30.0, "Seconds a request may wait for its inference (503 "
                                        "after).", flag="--request-timeout")
    body_timeout_s: float = _f(15.0, "Seconds between pieces of a request body (408 after).",
                               flag="--body-timeout")
    body_deadline_s: float = _f(60.0, "Seconds a whole request body may take to arrive (408 "
                                      "after).", flag="--body-deadline")
    max_decoded_bytes: int = _f(64 * 2**20, "Decode budget: bytes one image may take once "
                                            "decoded (too_large above).")
    max_pages: int = _f(64, "Decode budget: pages, planes or HDUs one image may need "
                            "(too_many_pages above).")
    decode_timeout_s: float = _f(5.0, "Decode budget: seconds one image may take to decode "
                                      "(decode_timeout, 422).", flag="--decode-timeout")
    expect_sha256: str | None = _f(None, "Refuse to serve any bundle but the one with this "
                                         "sha256 (imgtriage inspect prints it).")
    max_client_inflight: int = _f(32, "Open classify requests per client (API key or "
                                      "address; 429 above).")
    api_key_file: str | None = _f(None, "File with one accepted bearer token per line; "
                                        "without it no key is asked for.")
    cors_origins: tuple[str, ...] = _f((), "Allow this browser origin (repeat); CORS is off "
                                           "without it.", flag="--cors-origin", repeat=True)
    log_level: str = _f("info", "critical|error|warning|info|debug.")
    access_log: bool = _f(True, "Log one line per request.")
    root_path: str = _f("", "Path prefix a reverse proxy serves the app under, e.g. "
                            "/imgtriage.")
    legacy_classify: bool = _f(False, "Also answer the old Flask backend's clients: POST "
                                      "/classify {\"image\": \"<base64>\"} -> one flat result "
                                      "(docs/service.md).", flag="--legacy-classify-route")

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
