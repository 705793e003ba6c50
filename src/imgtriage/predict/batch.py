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

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

from imgtriage.data.discovery import iter_image_files
from imgtriage.errors import ConfigError
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
    are one row per file there.
    """
    for p in paths:
        path = Path(os.path.normpath(os.fsdecode(p)))
        if path.is_dir():
            for f in iter_image_files(path, include_hidden=True):
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
    from imgtriage.bundle.graph import usable_cores

    return max(2, min(4, usable_cores()))


class _Decoder:
    """Submit a batch of paths, get back a handle whose ``result()`` is the decoded batch."""

    def __init__(self, decoder: Decoder, workers: int, executor: str) -> None:
        if executor not in EXECUTORS:
            raise ConfigError(f"executor must be thread or process, got {executor!r} "
                              "(--executor)")
        self.decoder, self.workers, self.kind = decoder, workers, executor
        self.pool: Executor
        if executor == "thread":
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        else:
            from imgtriage.data.loaders import decoder_mp_context

            self.pool = ProcessPoolExecutor(workers, mp_context=decoder_mp_context())

    def submit(self, chunk: list[str]) -> list[Future]:
        if self.kind == "thread":
            return [self.pool.submit(decode_entry, self.decoder, p) for p in chunk]
        step = -(-len(chunk) // self.workers)
        return [self.pool.submit(_decode_many, chunk[i:i + step], self.decoder)
                for i in range(0, len(chunk), step)]

    def collect(self, futures: list[Future]) -> list[Entry]:
        if self.kind == "thread":
            return [f.result() for f in futures]
        return [d for f in futures for d in f.result()]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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
