"""A live progress line for batch runs: files classified, files/s and, when known, the ETA.

Files are listed as a stream, so the total is not known up front. When the inputs include
folders, a background thread counts them (a cheap directory walk, no decoding) and the ETA
appears once the count is in; until then the line shows files/s and elapsed time only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any


class RunProgress:
    """Counts of a run (classified, skipped) and, when ``enabled``, a rich progress line.

    Example:
        >>> with RunProgress(None, enabled=False) as bar:
        ...     bar.done(32)
        >>> bar.classified
        32
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]] | None, *,
                 enabled: bool = True, every: int = 1000, stream: Any = None) -> None:
        self.enabled = enabled
        self.every = every  # without a terminal: one plain line per this many files
        self._stream = stream
        self._plain: bool | None = None
        self._next_line = every
        self.classified = 0
        self.skipped_count = 0
        self.total: int | None = None
        self._paths = list(paths) if (enabled and paths is not None) else None
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    # -- counting ----------------------------------------------------------------------------
    def done(self, n: int) -> None:
        self.classified += n
        self._refresh()

    def skipped(self, n: int) -> None:
        self.skipped_count += n
        self._refresh()

    @property
    def rate(self) -> float:
        """Files classified per second since the start (skipped files do not count)."""
        dt = time.perf_counter() - self._t0
        return self.classified / dt if dt > 0 else 0.0

    def eta_seconds(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.classified - self.skipped_count) / self.rate)

    def _count_total(self) -> None:
        from imgtriage.predict.batch import iter_files

        n = 0
        for _ in iter_files(self._paths or []):
            if self._stop.is_set():
                return
            n += 1
        self.total = n
        self._refresh()

    # -- display -----------------------------------------------------------------------------
    def __enter__(self) -> RunProgress:
        self._t0 = time.perf_counter()
        if not self.enabled:
            return self
        stream = self._stream or sys.stderr
        self._plain = not stream.isatty()
        if self._plain:  # a log file or a pipe: plain lines, never a live bar
            if self._paths is not None:
                threading.Thread(target=self._count_total, daemon=True,
                                 name="count-files").start()
            return self
        from rich.progress import Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), _line_column(self),
                                  TimeElapsedColumn(), refresh_per_second=4, transient=False)
        self._progress.__enter__()
        self._task = self._progress.add_task("classify", total=None)
        if self._paths is not None:
            threading.Thread(target=self._count_total, daemon=True,
                             name="count-files").start()
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._stop.set()
        if self._plain:
            self._say()
        if self._progress is not None:
            self._refresh()
            self._progress.__exit__(*exc)
            self._progress = None
        return False

    def _say(self) -> None:
        print(f"classify: {self.line()}", file=self._stream or sys.stderr, flush=True)

    def _refresh(self) -> None:
        if self._plain and self.classified + self.skipped_count >= self._next_line:
            self._say()
            done = self.classified + self.skipped_count
            self._next_line = (done // self.every + 1) * self.every
        if self._progress is not None:
            self._progress.update(self._task, completed=self.classified + self.skipped_count,
                                  total=self.total)

    def line(self) -> str:
        """The text after the description: counts, files/s and the ETA when known."""
        text = f"{self.classified} classified"
        if self.skipped_count:
            text += f", {self.skipped_count} already done"
        if self.total is not None:
            text += f" of {self.total}"
        text += f"  {self.rate:.1f} files/s" if self.classified else "  … files/s"
        eta = self.eta_seconds()
        if eta is not None:
            text += f"  ETA {_hms(eta)}"
        return text


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _line_column(run: RunProgress) -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Line(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(run.line())

    return Line()

