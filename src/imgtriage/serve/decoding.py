"""The service's decode threads, watched so that slow files cannot take them over.

Each upload is decoded on its own task. The io layer stops a decode that runs past the
decode budget at its next step (a ``decode_timeout`` defect, 422); a decode stuck inside a
C decoder cannot be interrupted, so the request stops *waiting* for it once it has run
``decode_timeout_s`` plus a grace period, and answers the same defect. A thread busy past
``decode_timeout_s`` counts as stuck; when every thread is stuck the pool is *saturated*:
``/readyz`` turns 503 and new classify requests get 503 + Retry-After instead of queueing
behind files that will not finish.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

GRACE_S = 1.0  # past the decode budget before a request stops waiting for its decode
POLL_S = 0.1


class DecodeOverrun(Exception):
    """A decode ran past its budget and was left running; ``seconds`` it had taken."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"decode still running after {seconds:.1f} s")
        self.seconds = seconds


class DecodePool:
    """``threads`` decode threads; ``run`` awaits one call, ``saturated`` says all are stuck."""

    def __init__(self, threads: int, timeout_s: float) -> None:
        self.threads, self.timeout_s = threads, timeout_s
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="imgtriage-decode")
        self._started: dict[int, float] = {}  # running calls: token -> monotonic start
        self._tokens = itertools.count()
        self._lock = threading.Lock()

    def _call(self, token: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with self._lock:
            self._started[token] = time.monotonic()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._started.pop(token, None)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a decode thread; ``DecodeOverrun`` once it has run past
        ``timeout_s + GRACE_S`` (the thread finishes on its own; its result is dropped)."""
        token = next(self._tokens)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._call, token, fn, args)
        limit = self.timeout_s + GRACE_S
        while True:
            done, _ = await asyncio.wait({future}, timeout=POLL_S)
            if done:
                return future.result()
            with self._lock:
                started = self._started.get(token)
            if started is not None and time.monotonic() - started > limit:
                future.add_done_callback(_drop_result)
                raise DecodeOverrun(time.monotonic() - started)

    def busy(self) -> int:
        with self._lock:
            return len(self._started)

    def stuck(self) -> int:
        """Threads that have been decoding one call for longer than the decode budget."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for t in self._started.values() if now - t > self.timeout_s)

    def saturated(self) -> bool:
        return self.stuck() >= self.threads

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _drop_result(future: Any) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log "never retrieved"
