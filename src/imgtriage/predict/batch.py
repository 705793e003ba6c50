"""Batch runs over files: list as a stream, decode in parallel with inference, never lose a file.

``iter_predictions`` yields ``("result", row)`` or ``("defect", {path, issue, message})`` for
every file it is given, exactly once, in input order.

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
from typing import TYPE_CHECKING, Any

import numpy as np

from imgtriage.data.discovery import iter_image_files
from imgtriage.data.preprocess import load_input
from imgtriage.errors import ConfigError, ImageReadError
from imgtriage.io import Defect

if TYPE_CHECKING:
    from imgtriage.predict.predictor import PredictOptions, Predictor

EXECUTORS = ("thread", "process")
Decoded = tuple[np.ndarray, dict[str, Any]] | Defect


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


def decode_file(path: str, spec) -> Decoded:
    """One file -> (input, meta) or a Defect; nothing a file does can raise out of here."""
    try:
        return load_input(path, spec)
    except ImageReadError as exc:
        return exc.defect
    except Exception as exc:  # a decoder bug must not stop a run of millions of files
        return Defect(path, "decode_error", f"{type(exc).__name__}: {exc}")


def _decode_many(paths: list[str], spec) -> list[Decoded]:
    """A slice of a batch in one task (process workers: one pickle round trip per slice)."""
    return [decode_file(p, spec) for p in paths]


def _chunks(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(islice(it, n)):
        yield chunk


def default_workers() -> int:
    """Decoding workers: one per core, at least 2 so decoding overlaps inference."""
    from imgtriage.bundle.export import usable_cores

    return max(2, min(4, usable_cores()))


class _Decoder:
    """Submit a batch of paths, get back a handle whose ``result()`` is the decoded batch."""

    def __init__(self, spec, workers: int, executor: str) -> None:
        if executor not in EXECUTORS:
            raise ConfigError(f"executor must be thread or process, got {executor!r} "
                              "(--executor)")
        self.spec, self.workers, self.kind = spec, workers, executor
        self.pool: Executor
        if executor == "thread":
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        else:
            from imgtriage.data.loaders import decoder_mp_context

            self.pool = ProcessPoolExecutor(workers, mp_context=decoder_mp_context())

    def submit(self, chunk: list[str]) -> list[Future]:
        if self.kind == "thread":
            return [self.pool.submit(decode_file, p, self.spec) for p in chunk]
        step = -(-len(chunk) // self.workers)
        return [self.pool.submit(_decode_many, chunk[i:i + step], self.spec)
                for i in range(0, len(chunk), step)]

    def collect(self, futures: list[Future]) -> list[Decoded]:
        if self.kind == "thread":
            return [f.result() for f in futures]
        return [d for f in futures for d in f.result()]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def iter_predictions(predictor: Predictor, paths: Iterable[str | os.PathLike[str]], *,
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
    from imgtriage.predict.predictor import PredictOptions
    from imgtriage.predict.progress import RunProgress

    batch_size = batch_size or preferred_batch_size(predictor)
    if batch_size < 1:
        raise ConfigError("batch size must be >= 1 (--batch-size)")
    if prefetch < 1:
        raise ConfigError("prefetch must be >= 1 (--prefetch)")
    opts = opts or PredictOptions()
    bar = progress if isinstance(progress, RunProgress) else RunProgress(paths if progress
                                                                        else None,
                                                                        enabled=bool(progress))
    files = _skipping(iter_files(paths), skip, bar)
    decoder = _Decoder(predictor.spec, workers or default_workers(), executor)
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


def preferred_batch_size(predictor: Any) -> int:
    """The backend's preferred batch (ONNX 16 for big CNNs, 64 for small; torch 32)."""
    backend = getattr(predictor, "backend", None)
    return int(getattr(backend, "batch_size", 32) or 32)


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


def _finish(predictor: Predictor, decoder: _Decoder, chunk: list[str], futures: list[Future],
            opts: PredictOptions, bar: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    decoded = decoder.collect(futures)
    good = [(p, d) for p, d in zip(chunk, decoded, strict=True) if not isinstance(d, Defect)]
    rows: dict[int, dict[str, Any]] = {}
    if good:
        x = np.stack([d[0] for _, d in good])
        out = predictor.rows_for_inputs(x, [p for p, _ in good], opts, [d[1] for _, d in good])
        rows = {id(d): row for (_, d), row in zip(good, out, strict=True)}
    bar.done(len(chunk))
    for d in decoded:
        if isinstance(d, Defect):
            yield "defect", d.to_dict()
        else:
            yield "result", rows[id(d)]
