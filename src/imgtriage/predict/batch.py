"""Batch runs over files: list as a stream, decode in parallel with inference, never lose a file.

``iter_predictions`` yields ``("result", row)`` or ``("defect", {path, issue, message})`` for
every file it is given, exactly once, in input order. It takes any predictor kind
(:class:`~imgtriage.predict.base.BasePredictor`) and decodes each file once, with the kind's
own decoder.

The pipeline is bounded: at most ``prefetch`` batches are being decoded (by a pool of threads
or processes) while the model runs the current one, so memory does not grow with the number
of files. Threads are the default: Pillow, NumPy and ONNX Runtime release the GIL in their
heavy loops, and the benchmark (bench/bench_predict.py) measures both.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from itertools import islice
from pathlib import Path
from typing import Any

from imgtriage.data.discovery import iter_image_files
from imgtriage.errors import ConfigError
from imgtriage.io import Defect
from imgtriage.predict.base import (
    BasePredictor,
    Decoder,
    Entry,
    PredictOptions,
    decode_entry,
    is_defect,
)

EXECUTORS = ("thread", "process")


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Every input file, named as given but normalised (``./a/../b.png`` -> ``b.png``).

    Folders are expanded recursively (sorted, streamed), hidden files and folders included:
    every file under a folder given is an input and ends up in the results or the defects
    (a ``.DS_Store`` becomes an ``unsupported_format`` defect). Files and missing paths are
    kept, so a missing path becomes a ``not_found`` defect rather than vanishing. Names that
    are not valid UTF-8 come through losslessly (``os.fsdecode``: surrogate escapes). A
    result store keys each file by its absolute path, so ``dir``, ``/abs/dir`` and ``.``
    are one row per file there. Links to folders and folders that cannot be listed are
    yielded themselves, so they become defects rather than vanish. One path given alone (a
    str or Path) is that path, never its characters (whose '/' would walk the whole disk).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    for p in paths:
        path = Path(os.path.normpath(os.fsdecode(p)))
        if path.is_dir():
            for f in iter_image_files(path, include_hidden=True, yield_folders=True):
                yield str(f)
        else:
            yield str(path)


def _decode_many(paths: list[str], decoder: Decoder) -> list[Entry]:
    """A slice of a batch in one task (process workers: one pickle round trip per slice)."""
    return [decode_entry(decoder, p) for p in paths]


def _chunks(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(islice(it, n)):
        yield chunk


def default_workers() -> int:
    """Decoding workers: one per core, at least 2 so decoding overlaps inference."""
    from imgtriage.predict.ort_session import usable_cores

    return max(2, min(4, usable_cores()))


GRACE_S = 1.0  # past the decode budget before a batch stops waiting for one file
MAX_ABANDONED = 8  # stuck decodes left behind before the run stops adding fresh threads


class _Decoder:
    """Submit a batch of paths, get back a handle whose ``result()`` is the decoded batch.

    Thread workers are watched: a file still decoding ``decode_timeout_s`` (the read policy's)
    plus a grace second after it started becomes a ``decode_timeout`` defect, the run goes on
    without it, and later batches get fresh threads; the stuck one finishes on its own (the
    io layer stops most slow decodes itself at their next step).
    """

    def __init__(self, decoder: Decoder, workers: int, executor: str) -> None:
        if executor not in EXECUTORS:
            raise ConfigError(f"executor must be thread or process, got {executor!r} "
                              "(--executor)")
        self.decoder, self.workers, self.kind = decoder, workers, executor
        read = getattr(getattr(decoder, "spec", None), "read", None)
        self.timeout_s = float(getattr(read, "decode_timeout_s", 30.0))
        self._started: dict[int, float] = {}  # running decodes: submission key -> start
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._old: list[Executor] = []  # pools left with a stuck thread
        self.pool: Executor
        if executor == "thread":
            self.pool = self._threads()
        else:
            from imgtriage.data.loaders import decoder_mp_context

            self.pool = ProcessPoolExecutor(workers, mp_context=decoder_mp_context())

    def _threads(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="decode")

    def _watched(self, key: int, path: str) -> Entry:
        with self._lock:
            self._started[key] = time.monotonic()
        try:
            return decode_entry(self.decoder, path)
        finally:
            with self._lock:
                self._started.pop(key, None)

    def submit(self, chunk: list[str]) -> list[Future]:
        if self.kind == "thread":
            futures = []
            for p in chunk:
                key = next(self._keys)
                f = self.pool.submit(self._watched, key, p)
                f.imgtriage_watch = (key, p)  # type: ignore[attr-defined]
                futures.append(f)
            return futures
        step = -(-len(chunk) // self.workers)
        return [self.pool.submit(_decode_many, chunk[i:i + step], self.decoder)
                for i in range(0, len(chunk), step)]

    def collect(self, futures: list[Future]) -> list[Entry]:
        if self.kind == "thread":
            return [self._wait(f) for f in futures]
        return [d for f in futures for d in f.result()]

    def _wait(self, future: Future) -> Entry:
        while True:
            try:
                return future.result(timeout=0.25)
            except FutureTimeout:
                pass
            key, _ = future.imgtriage_watch  # type: ignore[attr-defined]
            with self._lock:
                started = self._started.get(key)
            if started is not None and time.monotonic() - started > self.timeout_s + GRACE_S:
                return self._abandon(future)

    def _abandon(self, future: Future) -> Entry:
        """Stop waiting for a stuck decode: a defect now, fresh threads for what follows."""
        _, path = future.imgtriage_watch  # type: ignore[attr-defined]
        if len(self._old) < MAX_ABANDONED:
            self._old.append(self.pool)
            self.pool = self._threads()
        return Defect(path, "decode_timeout",
                      f"'{path}' was still decoding {self.timeout_s + GRACE_S:g} s after it "
                      f"started, over the limit of {self.timeout_s:g} s "
                      "(ReadPolicy.decode_timeout_s); the file is unusually slow to decode: "
                      "re-export it, or raise the limit (--decode-timeout)").to_dict()

    def close(self) -> None:
        stuck = bool(self._old)
        self.pool.shutdown(wait=not stuck, cancel_futures=True)
        for pool in self._old:
            pool.shutdown(wait=False, cancel_futures=True)


def iter_predictions(predictor: BasePredictor, paths: Iterable[str | os.PathLike[str]], *,
                     batch_size: int | None = None, opts: PredictOptions | None = None,
                     workers: int | None = None, progress: bool | Any = False,
                     skip: Callable[[str], bool] | None = None, executor: str = "thread",
                     prefetch: int = 2) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(kind, item)`` pairs; up to ``prefetch`` batches decode while one runs.

    ``skip(path) -> bool`` lets a result store drop files it has already finished.
    ``batch_size`` None uses the backend's preferred batch. ``progress`` True shows a bar;
    a :class:`~imgtriage.predict.progress.RunProgress` may be passed instead.

    Example:
        >>> for kind, item in iter_predictions(p, ["inbox/"]):  # doctest: +SKIP
        ...     print(kind, item["path"])
    """
    from imgtriage.predict.progress import RunProgress

    batch_size = batch_size or predictor.batch_size
    if batch_size < 1:
        raise ConfigError("batch size must be >= 1 (--batch-size)")
    if prefetch < 1:
        raise ConfigError("prefetch must be >= 1 (--prefetch)")
    opts = predictor.options(opts)
    bar = progress if isinstance(progress, RunProgress) else RunProgress(paths if progress
                                                                        else None,
                                                                        enabled=bool(progress))
    files = _skipping(iter_files(paths), skip, bar)
    decoder = _Decoder(predictor.decoder, workers or default_workers(), executor)
    pending: deque[tuple[list[str], list[Future]]] = deque()
    try:
        with bar:
            for chunk in _chunks(files, batch_size):
                pending.append((chunk, decoder.submit(chunk)))
                if len(pending) > prefetch:
                    yield from _finish(predictor, decoder, *pending.popleft(), opts, bar)
            while pending:
                yield from _finish(predictor, decoder, *pending.popleft(), opts, bar)
    finally:
        decoder.close()


def _skipping(files: Iterator[str], skip: Callable[[str], bool] | None,
              bar: Any) -> Iterator[str]:
    if skip is None:
        yield from files
        return
    for f in files:
        if skip(f):
            bar.skipped(1)
        else:
            yield f


def _finish(predictor: BasePredictor, decoder: _Decoder, chunk: list[str],
            futures: list[Future], opts: PredictOptions, bar: Any
            ) -> Iterator[tuple[str, dict[str, Any]]]:
    rows = predictor.predict_entries(decoder.collect(futures), opts)
    bar.done(len(chunk))
    for row in rows:
        yield ("defect" if is_defect(row) else "result"), row
