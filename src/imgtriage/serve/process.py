"""Run ``imgtriage serve`` as a child process on loopback: start, wait until ready, stop.

For recipes, benchmarks and integration tests that need the real server (uvicorn, the
batcher, the limits) rather than an in-process app. Standard library only.

Example:
    >>> with start_service("bundle", log="serve.log") as svc:  # doctest: +SKIP
    ...     urllib.request.urlopen(svc.url + "/v1/model").read()
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgtriage.errors import ServiceStartError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    """A running ``imgtriage serve``: its process, base URL and log file."""

    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL after ``timeout`` s; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:  # refused, HTTP 503 while loading (HTTPError), timeouts
        return False


def start_service(bundle: str | os.PathLike[str], *, args: Sequence[str] = (),
                  host: str = "127.0.0.1", port: int | None = None,
                  log: str | os.PathLike[str] | None = None, timeout: float = 120.0,
                  env: dict[str, str] | None = None) -> ServiceProcess:
    """Start ``imgtriage serve BUNDLE --host HOST --port PORT ARGS...`` and return once
    ``/readyz`` answers 200 (model loaded and warmed up).

    ``port`` None takes a free one; ``log`` (default: ``serve-PORT.log`` in the working
    directory) receives the server's stdout and stderr. Raises :class:`ServiceStartError`
    with the log's tail when the process exits first or is not ready within ``timeout`` s
    (the process is stopped then).
    """
    port = free_port(host) if port is None else port
    log_path = Path(log) if log is not None else Path(f"serve-{port}.log")
    cmd = [sys.executable, "-m", "imgtriage", "serve", os.fspath(bundle), "--host", host,
           "--port", str(port), *args]
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env)
    svc = ServiceProcess(proc, f"http://{host}:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceStartError(f"imgtriage serve exited with code {proc.returncode}; "
                                    f"its log ({log_path}) ends:\n{_tail(log_path)}")
        if _ready(svc.url):
            return svc
        time.sleep(0.2)
    svc.stop()
    raise ServiceStartError(f"imgtriage serve was not ready within {timeout:g} s (raise "
                            f"timeout for a large model); its log ({log_path}) ends:\n"
                            f"{_tail(log_path)}")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"
