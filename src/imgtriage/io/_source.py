"""One input, whether a path on disk or bytes from an upload, and the failures readers raise.

Readers never build a :class:`Defect` themselves: they raise :class:`ReadFailure` with an issue
and a message that names the file, and the dispatcher turns it into a ``Defect``.
"""

from __future__ import annotations

import io
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from imgtriage.io._sniff import extension_of

HEAD_BYTES = 4096


class ReadFailure(Exception):
    """Internal: one file cannot be read; ``issue`` is one of ``DEFECT_ISSUES``."""

    def __init__(self, issue: str, message: str) -> None:
        super().__init__(message)
        self.issue = issue
        self.message = message


@dataclass(frozen=True)
class Source:
    """A file to read: ``path`` on disk or in-memory ``data``, shown to users as ``display``."""

    display: str
    extension: str
    size: int
    head: bytes
    path: Path | None = None
    data: bytes | None = None
    started: float = field(default_factory=time.monotonic)

    def open(self) -> BinaryIO:
        """A fresh binary file object positioned at the start (the caller closes it).

        The path is opened without blocking and must still be a regular file, so a file
        swapped for a FIFO after the first look cannot hang the reader.
        """
        if self.data is not None:
            return io.BytesIO(self.data)
        return open_regular(Path(self.path or ""), self.display)

    def elapsed(self) -> float:
        """Seconds since this input was first opened (the decode clock)."""
        return time.monotonic() - self.started

    def read_all(self) -> bytes:
        """All bytes of the input (files are read once, on demand)."""
        if self.data is not None:
            return self.data
        with self.open() as fh:
            return fh.read()

    def tail(self, n: int = 32) -> bytes:
        """The last ``n`` bytes, to tell a truncated file from a corrupt one."""
        if self.data is not None:
            return self.data[-n:]
        with self.open() as fh:
            fh.seek(max(self.size - n, 0))
            return fh.read(n)


def make_source(source: str | os.PathLike[str] | bytes, name: str | None) -> Source:
    """Check the input exists, can be opened and is not empty; read its first bytes.

    Raises ``ReadFailure`` with ``not_found``, ``permission_denied`` or ``empty_file``.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        display = name if name is not None else "<bytes>"
        src = Source(display, extension_of(display), len(data), data[:HEAD_BYTES], data=data)
    elif isinstance(source, str | os.PathLike):
        path = Path(os.fsdecode(source))
        display = name if name is not None else str(path)
        size, head = _stat_and_head(path, display)
        src = Source(display, extension_of(display), size, head, path=path)
    else:
        raise TypeError(
            f"source must be a path or bytes, not {type(source).__name__}; "
            "pass a str/pathlib.Path or the file's raw bytes"
        )
    if src.size == 0:
        raise ReadFailure("empty_file", f"'{display}' is empty (0 bytes); re-export or re-copy it")
    return src


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: Path, display: str) -> BinaryIO:
    """Open ``path`` for reading without ever blocking; refuse anything but a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once (no writer needed), and the check is
    made on the opened descriptor (``fstat``), so nothing can be swapped in between.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(str(path))
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise ReadFailure(
                "not_regular_file",
                f"'{display}' is {kind}, not a regular file; it was not read (reading it "
                "could block forever); remove it from the input or copy the data into a file",
            )
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    fh = os.fdopen(fd, "rb")
    fh.raw.name = str(path)  # type: ignore[attr-defined]  # decoders that print the name
    return fh


def _folder_failure(path: Path, display: str) -> ReadFailure:
    """A folder where a file was expected: a link to one, one that cannot be listed, or one."""
    if path.is_symlink():
        return ReadFailure("not_found", f"'{display}' is a link to a folder, not an image "
                                        "file; links to folders are not followed: pass the "
                                        "folder itself to read its files")
    if not os.access(path, os.R_OK | os.X_OK):
        return ReadFailure("permission_denied", f"'{display}' is a folder that cannot be "
                                                "listed (permission denied), so its files "
                                                "were not read; give the reading user access")
    return ReadFailure("not_found", f"'{display}' is a directory, not an image file; pass a "
                                    "file path")


def _missing(path: Path, display: str) -> ReadFailure:
    """A path that does not exist, or a link whose target does not (a dangling link)."""
    if path.is_symlink():
        return ReadFailure("not_found", f"'{display}' is a link to '{os.readlink(path)}', "
                                        "which does not exist; fix or remove the link")
    return ReadFailure("not_found", f"'{display}' does not exist; check the path and the "
                                    "working directory")


def _stat_and_head(path: Path, display: str) -> tuple[int, bytes]:
    """Open the file once: its size and first bytes, with OS errors mapped to issues."""
    try:
        if path.is_dir():
            raise _folder_failure(path, display)
        with open_regular(path, display) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEAD_BYTES)
    except FileNotFoundError:
        raise _missing(path, display) from None
    except PermissionError:
        raise ReadFailure(
            "permission_denied",
            f"'{display}' exists but cannot be opened (permission denied); "
            "give the reading user read access (e.g. chmod a+r)",
        ) from None
    except IsADirectoryError:
        raise ReadFailure("not_found", f"'{display}' is a directory, not an image file") from None
    except OSError as exc:
        raise ReadFailure("decode_error", f"'{display}' cannot be read: {exc}") from None
    return size, head
