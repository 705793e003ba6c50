"""Helpers for the service tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import io
import threading
import time

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
