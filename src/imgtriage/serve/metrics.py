"""Prometheus metrics of one app, in its own registry (several apps can live in one process).

Served as text at ``GET /metrics``:

- ``imgtriage_http_requests_total{route,method,status}`` and
  ``imgtriage_http_request_duration_seconds{route}``: every request, refusals included;
- ``imgtriage_batch_size`` and ``imgtriage_inference_duration_seconds``: each inference call;
- ``imgtriage_queue_depth``: images waiting for inference;
- ``imgtriage_images_total{outcome}`` (result | defect), ``imgtriage_abstained_total`` and
  ``imgtriage_abstain_ratio`` (abstained / results since start);
- ``imgtriage_defects_total{issue}``: per-image defects by io issue;
- ``imgtriage_ready`` and ``imgtriage_model_info{bundle_sha256,backend,...}``.

With several uvicorn workers each process counts its own requests: scrape each worker (one
worker per container) or sum in PromQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from imgtriage.errors import require

ROUTES = ("/", "/v1/classify", "/v1/model", "/livez", "/readyz", "/metrics", "/docs",
          "/openapi.json", "/classify")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def route_label(path: str) -> str:
    """A bounded label for a path: known routes as they are, everything else 'other'."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


def _app_path(scope: dict) -> str:
    """The path as the app routes it: behind ``--root-path`` (a proxy prefix) uvicorn puts the
    prefix in ``path`` too, and the label must not turn every request into 'other'."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class Metrics:
    """The service's counters, gauges and histograms, registered in ``self.registry``."""

    def __init__(self) -> None:
        pc = require("prometheus_client", "serve")
        self._pc = pc
        self.registry = reg = pc.CollectorRegistry()
        self.requests = pc.Counter("imgtriage_http_requests", "HTTP requests answered",
                                   ["route", "method", "status"], registry=reg)
        self.latency = pc.Histogram("imgtriage_http_request_duration_seconds",
                                    "Time from request start to response end", ["route"],
                                    buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = pc.Histogram("imgtriage_batch_size", "Images per inference call",
                                       buckets=BATCH_BUCKETS, registry=reg)
        self.inference = pc.Histogram("imgtriage_inference_duration_seconds",
                                      "Model time per inference call (uploads are decoded "
                                      "before they queue)",
                                      buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_depth = pc.Gauge("imgtriage_queue_depth", "Images waiting for inference",
                                    registry=reg)
        self.images = pc.Counter("imgtriage_images", "Images answered, by outcome",
                                 ["outcome"], registry=reg)
        self.abstained = pc.Counter("imgtriage_abstained", "Results that abstained (unknown)",
                                    registry=reg)
        self.abstain_ratio = pc.Gauge("imgtriage_abstain_ratio",
                                      "Abstained results / all results since start",
                                      registry=reg)
        self.defects = pc.Counter("imgtriage_defects", "Per-image defects, by io issue",
                                  ["issue"], registry=reg)
        self.ready = pc.Gauge("imgtriage_ready", "1 once the model is loaded and warmed up",
                              registry=reg)
        self.model_info = pc.Info("imgtriage_model", "The bundle being served", registry=reg)
        from imgtriage.io import DEFECT_ISSUES

        for issue in DEFECT_ISSUES:
            self.defects.labels(issue=issue)
        for outcome in ("result", "defect"):
            self.images.labels(outcome=outcome)
        self._results = 0
        self._abstained = 0

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def observe_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count each per-image entry of a response: a result (abstained or not) or a defect."""
        for row in rows:
            if "issue" in row:
                self.images.labels(outcome="defect").inc()
                self.defects.labels(issue=row["issue"]).inc()
                continue
            self.images.labels(outcome="result").inc()
            self._results += 1
            if row.get("abstained"):
                self.abstained.inc()
                self._abstained += 1
        if self._results:
            self.abstain_ratio.set(self._abstained / self._results)

    def render(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Plain ASGI middleware: count and time every HTTP request, whatever answered it."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering
        t0 = time.perf_counter()

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = route_label(_app_path(scope))
            self.metrics.requests.labels(route=route, method=scope.get("method", "?"),
                                         status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
