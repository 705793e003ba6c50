"""Dynamic batching: merge the images of concurrent requests into one inference call.

Requests become jobs in one queue. A collector task on the event loop takes the oldest job and
lets it wait for others with the same options to fill ``max_batch`` images; a full batch goes at
once. The wait is only spent while more work is known to be coming:

* another request is still being received or decoded (see :meth:`Batcher.receiving`), or
* the clients answered by the previous batch have not sent their next requests yet: a batch
  that answered *n* images expects *n* more to arrive after it ended (a client that sends its
  next request when it gets an answer, the usual way a pipeline calls a service).

It lasts at most ``max_wait_s``, counted from the later of the job's arrival and the end of
the previous batch, so the model never idles longer than that. The second rule keeps
concurrent clients in one batch: without it, eight clients settle into two groups of four
that alternate (each group queues while the other's batch runs), and a batch of four uses the
cores less well than one of eight. It is dropped while the answered clients have mostly *not*
come back within ``max_wait_s`` of recent batches (independent users, who send when they
like): then a queued request does not wait for them. A lone client never waits: its next
request is the one expected. The batch runs in a single worker thread, so the event loop
keeps accepting and parsing requests meanwhile. The queue is bounded in images: past
``max_queue`` a submit raises :class:`QueueFull` (503 + Retry-After).

Example:
    >>> async def demo():  # doctest: +SKIP
    ...     b = Batcher(lambda items, names, opts: [{"n": len(x)} for x in items], max_batch=8)
    ...     b.start()
    ...     rows = await b.submit([b"ab"], ["a"], key=None)
    ...     await b.stop()
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("imgtriage.serve")

InferFn = Callable[[list[Any], list[str], Any], list[dict[str, Any]]]


class QueueFull(Exception):
    """The queue cannot take this request; ``retry_after`` is a hint in whole seconds."""

    def __init__(self, queued: int, capacity: int, retry_after: int) -> None:
        super().__init__(f"{queued} images queued, capacity {capacity}")
        self.queued, self.capacity, self.retry_after = queued, capacity, retry_after


@dataclass
class _Job:
    items: list[Any]
    names: list[str]
    key: Hashable
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class _ReturnTracker:
    """How reliably the clients a batch answered send their next request in time.

    Each batch end opens an observation (its end time, the images it answered). Once its
    window (the batcher's ``max_wait_s`` after the end) has passed, the images that arrived
    within it, capped at the number answered, over that number, move an average (weight
    ``alpha``). Closed-loop clients keep it near 1; independent users (open-loop traffic)
    drive it down, and queued requests then stop waiting for clients that are not coming
    back. It starts at 1.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.rate = 1.0
        self._open: deque[tuple[float, int]] = deque()  # (batch end, images answered)
        self._arrivals: deque[tuple[float, int]] = deque()  # (time, images), while observing

    def batch_ended(self, at: float, images: int, window_s: float) -> None:
        self._settle(at, window_s)  # every batch: the queues stay bounded under any load
        self._open.append((at, images))

    def arrived(self, at: float, images: int) -> None:
        if self._open:
            self._arrivals.append((at, images))

    def reliable(self, now: float, window_s: float) -> bool:
        """True while the average is at least one half."""
        self._settle(now, window_s)
        return self.rate >= 0.5

    def _settle(self, now: float, window_s: float) -> None:
        """Close the observations whose window has passed; forget arrivals none can use."""
        while self._open and self._open[0][0] + window_s <= now:
            end, answered = self._open.popleft()
            came = sum(n for t, n in self._arrivals if end <= t < end + window_s)
            self.rate += self.alpha * (min(1.0, came / max(answered, 1)) - self.rate)
        oldest = self._open[0][0] if self._open else now
        while self._arrivals and self._arrivals[0][0] < oldest:
            self._arrivals.popleft()


class Batcher:
    """Collect jobs into batches and run ``infer(items, names, key)`` on one worker thread.

    ``key`` groups what may share a batch (the prediction options); ``on_batch(size, secs)``
    and ``on_depth(images)`` feed the metrics.
    """

    def __init__(self, infer: InferFn, *, max_batch: int = 16, max_wait_s: float = 0.05,
                 max_queue: int = 256, on_batch: Callable[[int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        self.infer, self.max_batch, self.max_wait_s = infer, max_batch, max_wait_s
        self.max_queue = max_queue
        self._on_batch, self._on_depth = on_batch, on_depth
        self._queue: deque[_Job] = deque()
        self._depth = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._rate = 0.0  # images per second, smoothed, for Retry-After
        self._receiving = 0  # requests whose bodies are being read (they will submit soon)
        self._free_since = 0.0  # when the previous batch ended (monotonic seconds)
        self._answered = 0  # images the previous batch answered: their clients come back
        self._answered_key: Hashable = None  # ... with the same options, most likely
        self._returns = _ReturnTracker()

    @property
    def depth(self) -> int:
        """Images waiting for inference (not counting the batch being computed)."""
        return self._depth

    @contextmanager
    def receiving(self) -> Iterator[None]:
        """Mark a request that is still reading its body: a batch may wait for it."""
        self._receiving += 1
        try:
            yield
        finally:
            self._receiving -= 1
            if self._wake is not None:
                self._wake.set()

    def _more_coming(self, key: Hashable) -> bool:
        """A request is on its way, or the previous batch's clients are not all back."""
        if self._receiving > 0:
            return True
        if key != self._answered_key or not self._returns.reliable(time.monotonic(),
                                                                          self.max_wait_s):
            return False
        back = sum(len(j.items) for j in self._queue
                   if j.key == key and j.arrived >= self._free_since and not j.future.done())
        return back < self._answered

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="imgtriage-infer")
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._queue.clear()
        self._set_depth(0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def retry_after(self) -> int:
        """Seconds until the current queue should have drained (1..30)."""
        if self._rate <= 0:
            return 1
        return max(1, min(30, math.ceil(self._depth / self._rate)))

    def check_room(self, n: int) -> None:
        """Raise :class:`QueueFull` now if ``n`` more images would not fit in the queue."""
        if self._depth + n > self.max_queue:
            raise QueueFull(self._depth, self.max_queue, self.retry_after())

    def enqueue(self, items: list[Any], names: list[str], key: Hashable) -> asyncio.Future:
        """Queue one request's images now; the future gets its rows, in order.

        Synchronous on purpose: a request that has just finished receiving is in the queue
        before the collector can run again. Cancelling the future drops the job.
        """
        if self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        self.check_room(len(items))
        job = _Job(items, names, key, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._returns.arrived(job.arrived, len(items))
        self._set_depth(self._depth + len(items))
        self._wake.set()
        return job.future

    async def submit(self, items: list[Any], names: list[str], key: Hashable) -> list[dict]:
        """Queue one request's images and wait for its rows."""
        return await self.enqueue(items, names, key)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._on_depth is not None:
            self._on_depth(depth)

    async def _collect(self) -> None:
        assert self._wake is not None
        while True:
            try:
                while not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                first = self._queue[0]
                deadline = max(first.arrived, self._free_since) + self.max_wait_s
                while self._ready(first.key) < self.max_batch and self._more_coming(first.key):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    except TimeoutError:
                        break
                batch = self._take(first.key)
                if batch:
                    await self._run(batch)
                    self._free_since = time.monotonic()
                    self._answered = sum(len(j.items) for j in batch)
                    self._answered_key = first.key
                    self._returns.batch_ended(self._free_since, self._answered,
                                              self.max_wait_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # the collector must never die; each job got its error
                log.exception("batch collector error")

    def _ready(self, key: Hashable) -> int:
        return sum(len(j.items) for j in self._queue if j.key == key and not j.future.done())

    def _take(self, key: Hashable) -> list[_Job]:
        """Oldest jobs with ``key`` up to max_batch images (always at least one job)."""
        batch, size, keep, full = [], 0, deque(), False
        while self._queue:
            job = self._queue.popleft()
            if job.future.done():  # cancelled by its request's timeout: drop it
                self._set_depth(self._depth - len(job.items))
            elif job.key == key and not full and (
                    not batch or size + len(job.items) <= self.max_batch):
                batch.append(job)
                size += len(job.items)
                self._set_depth(self._depth - len(job.items))
            else:
                full = full or job.key == key  # later jobs must not overtake this one
                keep.append(job)
        self._queue = keep
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        items = [x for j in batch for x in j.items]
        names = [n for j in batch for n in j.names]
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(self._executor, self.infer, items, names,
                                              batch[0].key)
            if len(rows) != len(items):
                raise RuntimeError(f"inference returned {len(rows)} rows for {len(items)} "
                                   "images")
        except Exception as exc:
            log.exception("inference failed for a batch of %d images", len(items))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        secs = time.perf_counter() - t0
        self._rate = len(items) / secs if self._rate == 0 else (
            0.8 * self._rate + 0.2 * len(items) / max(secs, 1e-6))
        if self._on_batch is not None:
            self._on_batch(len(items), secs)
        start = 0
        for job in batch:
            part = rows[start:start + len(job.items)]
            start += len(job.items)
            if not job.future.done():
                job.future.set_result(part)
