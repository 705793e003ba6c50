"""Batch runs over files: list as a stream, decode in parallel with inference, never lose a file.

``iter_predictions`` yields ``("result", row)`` or ``("defect", {path, issue, message})`` for
every file it is given, exactly once, in input order within each batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Expand folders recursively (sorted, streamed); keep files and missing paths as given,
    so a missing path becomes a ``not_found`` defect rather than vanishing."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for f in iter_image_files(path):
                yield str(f)
        else:
            yield str(path)


def _decode(path: str, spec) -> tuple[np.ndarray, dict[str, Any]] | Defect:
    try:
        return load_input(path, spec)
    except ImageReadError as exc:
        return exc.defect
    except Exception as exc:  # a decoder bug must not stop a run of millions of files
        return Defect(path, "decode_error", f"{type(exc).__name__}: {exc}")


def _chunks(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(islice(it, n)):
        yield chunk


def iter_predictions(predictor: Predictor, paths: Iterable[str | os.PathLike[str]], *,
                     batch_size: int = 32, opts: PredictOptions | None = None,
                     workers: int | None = None, progress: bool = False,
                     skip: Any = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream (kind, item) pairs; the next batch decodes while the current one runs.

    ``skip(path) -> bool`` lets a result store drop files it has already finished.
    """
    from imgtriage.predict.predictor import PredictOptions

    if batch_size < 1:
        raise ConfigError("batch size must be >= 1 (--batch-size)")
    opts = opts or PredictOptions()
    files = iter_files(paths)
    if skip is not None:
        files = (f for f in files if not skip(f))
    workers = workers or max(1, min(4, (os.cpu_count() or 1)))
    bar = _progress_bar() if progress else None
    with ThreadPoolExecutor(max_workers=workers) as pool, (bar or _null()) as live:
        task = live.add_task("classify", total=None) if bar else None
        pending: tuple[list[str], list[Future]] | None = None
        for chunk in _chunks(files, batch_size):
            futures = [pool.submit(_decode, f, predictor.spec) for f in chunk]
            if pending is not None:
                yield from _finish(predictor, *pending, opts)
                if bar:
                    live.advance(task, len(pending[0]))
            pending = (chunk, futures)
        if pending is not None:
            yield from _finish(predictor, *pending, opts)
            if bar:
                live.advance(task, len(pending[0]))


def _finish(predictor: Predictor, chunk: list[str], futures: list[Future],
            opts: PredictOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    decoded = [f.result() for f in futures]
    good = [(p, d) for p, d in zip(chunk, decoded, strict=True) if not isinstance(d, Defect)]
    rows = {}
    if good:
        x = np.stack([d[0] for _, d in good])
        for row in predictor.rows_for_inputs(x, [p for p, _ in good], opts,
                                             [d[1] for _, d in good]):
            rows[row["path"]] = row
    for p, d in zip(chunk, decoded, strict=True):
        if isinstance(d, Defect):
            yield "defect", d.to_dict()
        else:
            yield "result", rows[p]


def _progress_bar():
    """A live line with files done, files/s and elapsed time (the total is unknown: files
    are listed as a stream)."""
    from rich.progress import Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} files/s" if speed else "… files/s")

    return Progress(TextColumn("classified {task.completed} files"), Rate(),
                    TimeElapsedColumn(), transient=False)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
