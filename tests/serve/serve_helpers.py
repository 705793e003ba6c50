"""Helpers for the service tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROBLEM = "application/problem+json"


def png_bytes(size: int = 32, seed: int = 0, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, "PNG")
    return buf.getvalue()


def wait_ready(client, timeout: float = 60.0) -> None:
    """Poll /readyz like a load balancer would (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the app did not become ready in time")


class Gate:
    """Blocks a patched Predictor method until released (bounded), counting calls.

    Calls pass straight through until ``armed`` (so the app's warm-up is not held).
    """

    def __init__(self, armed: bool = False) -> None:
        self.armed = armed
        self.event = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def wrap(self, fn):
        def gated(*args, **kwargs):
            if not self.armed:
                return fn(*args, **kwargs)
            self.calls += 1
            self.entered.release()
            if not self.event.wait(30):
                raise RuntimeError("test gate was never opened")
            return fn(*args, **kwargs)
        return gated

    def wait_entered(self, timeout: float = 10.0) -> None:
        assert self.entered.acquire(timeout=timeout), "the gated call never started"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log


def start_server(bundle: Path, tmp: Path, *args: str, timeout: float = 90.0) -> LiveServer:
    """Start `imgtriage serve` on a free loopback port and wait (bounded) until ready."""
    import httpx

    port = free_port()
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "imgtriage", "serve", str(bundle), "--host", "127.0.0.1",
           "--port", str(port), "--threads", "1", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return LiveServer(proc, url, log)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise AssertionError(f"server not ready in {timeout}s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def assert_problem(r, status: int, slug: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["type"].startswith("urn:imgtriage:problem:")
    if slug:
        assert body["type"].endswith(":" + slug), body["type"]
    return body


def still_serving(client, data: bytes) -> None:
    r = client.post("/v1/classify", files=[("files", ("ok.png", data, "image/png"))])
    assert r.status_code == 200 and "class" in r.json()["results"][0]


def metric_samples(client) -> dict[tuple[str, tuple], float]:
    out = {}
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
