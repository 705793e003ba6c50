"""The model behind one app: loaded once in the lifespan, warmed up, then fed by the batcher.

Loading runs in a background thread so that ``/livez`` answers at once while a large bundle
loads; ``/readyz`` and ``/v1/classify`` answer 503 with Retry-After until the model has been
loaded *and* has run a warm-up batch (the first calls of a model are slow: allocation, kernel
selection), so a load balancer only sends traffic to a worker that will answer at full speed.
Any predictor kind is served through the one contract,
:class:`~imgtriage.predict.base.BasePredictor`: uploads are decoded by the kind's own decoder
(once each), and only decoded inputs join a batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from typing import Any

import numpy as np

from imgtriage.predict.base import BasePredictor, Decoded, PredictOptions
from imgtriage.predict.limits import with_read_limits
from imgtriage.serve.batching import Batcher, QueueFull
from imgtriage.serve.config import ServeConfig
from imgtriage.serve.decoding import DecodeOverrun, DecodePool
from imgtriage.serve.inputs import Upload, precheck
from imgtriage.serve.metrics import Metrics
from imgtriage.serve.problems import Problem

log = logging.getLogger("imgtriage.serve")


def limit_pixels(predictor: BasePredictor, max_pixels: int) -> tuple[BasePredictor, int]:
    """The predictor with its read policy tightened to ``max_pixels``, and the limit in force.

    The io layer refuses a larger image with the ``too_many_pixels`` defect before decoding it
    (decompression bombs). A bundle's own, lower limit is kept. The caller's predictor is not
    changed: a shallow copy (sharing the loaded model) gets the tighter policy.
    """
    limited = with_read_limits(predictor, tighten_only=True, max_pixels=max_pixels)
    return limited, limited.spec.read.max_pixels


def limit_reading(predictor: BasePredictor, cfg: ServeConfig
                  ) -> tuple[BasePredictor, dict[str, Any]]:
    """The predictor under the service's decode budget (a bundle's lower values kept), and
    the budget in force (reported on /v1/model)."""
    p, max_pixels = limit_pixels(predictor, cfg.max_pixels)
    p = with_read_limits(p, tighten_only=True, max_decoded_bytes=cfg.max_decoded_bytes,
                         max_pages=cfg.max_pages, decode_timeout_s=cfg.decode_timeout_s)
    read = p.spec.read
    return p, {"max_pixels": max_pixels, "max_decoded_bytes": read.max_decoded_bytes,
               "max_pages": read.max_pages, "decode_timeout_s": read.decode_timeout_s}


def warm_up(predictor: BasePredictor, max_batch: int) -> None:
    """Run the model at batch 1 and at the largest batch, and decode one PNG."""
    from PIL import Image

    h, w = predictor.spec.size
    c = predictor.spec.in_chans
    rng = np.random.default_rng(0)
    shape = (h, w) if c == 1 else (h, w, c)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(max_batch)]
    predictor.predict_arrays(arrays[:1])
    predictor.predict_arrays(arrays)
    buf = io.BytesIO()
    Image.fromarray(arrays[0] if c in (1, 3, 4) else arrays[0][..., 0]).save(buf, "PNG")
    predictor.predict_bytes([buf.getvalue()], ["warmup.png"])


class ModelRuntime:
    """Loads, warms and serves one predictor; ``state`` is loading | ready | failed."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics,
                 predictor: BasePredictor | None = None) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.predictor = predictor
        self.state = "loading"
        self.error: str | None = None
        self.description: dict[str, Any] = {}
        self.max_pixels: int | None = None
        self.budget: dict[str, Any] = {}
        self.batcher: Batcher | None = None
        self._decoder: DecodePool | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._load(), name="model-load")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        if self._decoder is not None:
            self._decoder.shutdown()

    async def _load(self) -> None:
        try:
            self.predictor = await asyncio.to_thread(self._load_and_warm)
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("the model could not be loaded: %s", self.error)
            return
        self.description = self.predictor.describe()
        self.batcher = Batcher(self._infer, max_batch=self.cfg.max_batch_size,
                               max_wait_s=self.cfg.max_wait_ms / 1000,
                               max_queue=self.cfg.max_queue,
                               on_batch=self.metrics.observe_batch,
                               on_depth=self.metrics.queue_depth.set)
        self.batcher.start()
        self._decoder = DecodePool(self.cfg.compute_threads,
                                   float(self.budget.get("decode_timeout_s")
                                         or self.cfg.decode_timeout_s))
        d = self.description
        self.metrics.model_info.info({"bundle_sha256": str(d.get("bundle_sha256")),
                                      "bundle_version": str(d.get("bundle_version")),
                                      "backend": str(d.get("backend")),
                                      "precision": str(d.get("precision")),
                                      "classes": str(len(d.get("classes", [])))})
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model ready: %s (%s) | backend %s, precision %s, threads %s", self.cfg.bundle,
                 d.get("bundle_sha256", "")[:12], d.get("backend"), d.get("precision", "-"),
                 d.get("threads", self.cfg.compute_threads))

    def _load_and_warm(self) -> BasePredictor:
        p = self.predictor
        if p is None:
            from imgtriage.predict import Predictor

            p = Predictor.load(self.cfg.bundle, backend=self.cfg.backend,
                               num_threads=self.cfg.compute_threads,
                               precision=self.cfg.precision,
                               expect_sha256=self.cfg.expect_sha256)
        elif self.cfg.expect_sha256 is not None and hasattr(p, "bundle"):
            from imgtriage.bundle import check_pinned

            check_pinned(p.bundle, self.cfg.expect_sha256)
        p, self.budget = limit_reading(p, self.cfg)
        self.max_pixels = self.budget["max_pixels"]
        warm_up(p, self.cfg.max_batch_size)
        return p

    def _infer(self, items: list[Decoded], names: list[str], opts: PredictOptions
               ) -> list[dict[str, Any]]:
        assert self.predictor is not None
        return self.predictor.predict_decoded(items, **dataclasses.asdict(opts))

    # -- used by the routes ------------------------------------------------------------
    def require_ready(self) -> None:
        if self.state == "ready":
            if self._decoder is not None and self._decoder.saturated():
                raise Problem(503, "decoder-saturated", "Decoder saturated",
                              f"all {self._decoder.threads} decode threads are busy with "
                              f"files slower than {self._decoder.timeout_s:g} s "
                              "(--decode-timeout); retry shortly",
                              headers={"Retry-After": "2"})
            return
        if self.state == "failed":
            raise Problem(503, "model-failed", "Model unavailable",
                          f"the model failed to load: {self.error}")
        raise Problem(503, "not-ready", "Not ready yet",
                      "the model is still loading and warming up; retry shortly",
                      headers={"Retry-After": "2"})

    def identity(self) -> dict[str, Any]:
        """What answered a request: the bundle, and the backend and precision it ran with."""
        d = self.description
        return {k: d.get(k) for k in ("bundle_sha256", "bundle_version", "schema_version",
                                      "backend", "precision")}

    def options(self, **given: Any) -> PredictOptions:
        """Validated PredictOptions for a request (422 for an unknown profile or topk)."""
        from imgtriage.errors import ImgTriageError

        classes = self.description.get("classes", [])
        if given.get("topk") is not None and given["topk"] > len(classes):
            raise Problem(422, "invalid-parameters", "Invalid parameters",
                          f"topk={given['topk']} but the model has {len(classes)} classes")
        assert self.predictor is not None
        try:
            opts = self.predictor.options(**given)
            self.predictor.policy_for(opts)
        except ImgTriageError as exc:
            raise Problem(422, "invalid-parameters", "Invalid parameters", str(exc)) from None
        return opts

    async def _decode(self, upload: Upload) -> Any:
        """One upload on a decode thread: a Decoded input or a defect dict; a decode that
        runs past the budget (stuck in a decoder) is answered as ``decode_timeout``."""
        assert self._decoder is not None
        try:
            (out,) = await self._decoder.run(self.predictor.decode_bytes, [upload.data],
                                             [upload.name])
        except DecodeOverrun as exc:
            from imgtriage.io import Defect

            timeout = self._decoder.timeout_s
            return Defect(upload.name, "decode_timeout",
                          f"'{upload.name}' was still decoding after {exc.seconds:.1f} s, "
                          f"over the limit of {timeout:g} s (--decode-timeout); the file is "
                          "unusually slow to decode: re-export it").to_dict()
        return out

    async def _decode_all(self, uploads: list[Upload]) -> list[Any]:
        """Decode a request's uploads, at most ``threads - 1`` at a time (at least one), so a
        request of many slow files cannot queue the pool full: the uploads of the requests
        behind it get a decode thread between its files."""
        assert self._decoder is not None
        gate = asyncio.Semaphore(max(1, self._decoder.threads - 1))

        async def one(upload: Upload) -> Any:
            async with gate:
                return await self._decode(upload)

        return list(await asyncio.gather(*(one(u) for u in uploads)))

    async def classify(self, uploads: list[Upload], opts: PredictOptions
                       ) -> list[dict[str, Any]]:
        """One entry per upload, in order: a result row or a defect dict.

        Uploads are decoded here, on the decode threads, as soon as they have arrived; only
        decoded images join the batcher's queue, so the model thread does nothing but the
        forward pass while the next requests are being decoded.
        """
        assert self.batcher is not None and self._decoder is not None
        entries: list[dict[str, Any] | None] = [precheck(u, self.cfg) for u in uploads]
        todo = [i for i, e in enumerate(entries) if e is None]
        if not todo:
            return entries  # type: ignore[return-value]
        try:
            self.batcher.check_room(len(todo))
            with self.batcher.receiving():
                decoded = await self._decode_all([uploads[i] for i in todo])
            ready: list[tuple[int, Decoded]] = []
            for i, d in zip(todo, decoded, strict=True):
                if isinstance(d, Decoded):
                    ready.append((i, d))
                else:
                    entries[i] = d  # a defect: it never enters a batch
            if ready:
                future = self.batcher.enqueue([d for _, d in ready], [d.name for _, d in ready],
                                              opts)
                rows = await asyncio.wait_for(future, self.cfg.request_timeout_s)
                for (i, _), row in zip(ready, rows, strict=True):
                    entries[i] = row
        except QueueFull as exc:
            raise Problem(503, "overloaded", "Server overloaded",
                          f"{exc.queued} images are waiting for inference (capacity "
                          f"{exc.capacity}, --max-queue); retry after {exc.retry_after} s",
                          headers={"Retry-After": str(exc.retry_after)}) from None
        except TimeoutError:
            raise Problem(503, "inference-timeout", "Inference timed out",
                          f"no answer within {self.cfg.request_timeout_s:g} s "
                          "(--request-timeout); the server is busy, retry later",
                          headers={"Retry-After": str(self.batcher.retry_after())}) from None
        return entries  # type: ignore[return-value]
