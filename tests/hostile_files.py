"""Hostile inputs built cheaply, and a peak-memory meter (shared by tests and bench_soak.py).

Every builder makes a file that is small on disk (or sparse) but would cost gigabytes or
minutes to decode naively. Import as ``from hostile_files import ...`` (tests/ is on the path).
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BLOCK = 4 * 2**20


def _repeated_deflate(block: bytes, count: int) -> bytes:
    """A raw deflate stream of ``block`` repeated ``count`` times, compressing it only once.

    A full flush makes each compressed copy independent of the ones before it, so the copies
    can be concatenated; the final empty block ends the stream.
    """
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    return chunk * count + end


def _zero_stream(nbytes: int) -> bytes:
    """A raw deflate stream of ``nbytes`` zeros, built from one compressed 4 MiB block."""
    count, rest = divmod(nbytes, _BLOCK)
    body = _repeated_deflate(bytes(_BLOCK), count)[:-2] if count else b""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    return body + comp.compress(bytes(rest)) + comp.flush(zlib.Z_FINISH)


def _checksum(fn: Callable[[bytes, int], int], start: int, prefix: bytes, zeros: int) -> int:
    value = fn(prefix, start)
    block = bytes(_BLOCK)
    count, rest = divmod(zeros, _BLOCK)
    for _ in range(count):
        value = fn(block, value)
    return fn(bytes(rest), value) & 0xFFFFFFFF


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 10_000, height: int = 10_000, *, bit_depth: int = 16,
             color_type: int = 6) -> bytes:
    """A valid all-zero PNG (default 16-bit RGBA 10000x10000: 800 MB decoded, ~0.8 MB file)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = (1 + width * channels * bit_depth // 8) * height  # a filter byte starts each row
    adler = _checksum(zlib.adler32, 1, b"", raw)
    stream = b"\x78\xda" + _zero_stream(raw) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


def tiff_of_pages(pages: int) -> bytes:
    """A little-endian TIFF of ``pages`` 1x1 8-bit pages (~90 bytes a page)."""
    entries = ((256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, None), (277, 3, 1), (278, 3, 1), (279, 4, 1))
    ifd_size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for index in range(pages):
        start = 8 + index * (ifd_size + 2)
        pixel = start + ifd_size
        nxt = start + ifd_size + 2 if index < pages - 1 else 0
        ifd = bytearray(struct.pack("<H", len(entries)))
        for tag, kind, value in entries:
            value = pixel if value is None else value
            packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            ifd += struct.pack("<HHI", tag, kind, 1) + packed
        ifd += struct.pack("<I", nxt)
        out += ifd + b"\x80\x00"
    return bytes(out)


def fits_header(cards: dict[str, Any]) -> bytes:
    """A FITS header block (80-character cards, END, padded to 2880 bytes)."""
    lines = []
    for key, value in cards.items():
        text = ("T" if value else "F") if isinstance(value, bool) else str(value)
        lines.append(f"{key:<8}= {text:>20}".ljust(80))
    lines.append("END".ljust(80))
    raw = "".join(lines).encode("ascii")
    return raw + b" " * (-len(raw) % 2880)


def cube_cards(width: int, height: int, planes: int, bitpix: int = -32,
               **extra: Any) -> dict[str, Any]:
    return {"SIMPLE": True, "BITPIX": bitpix, "NAXIS": 3, "NAXIS1": width, "NAXIS2": height,
            "NAXIS3": planes, **extra}


def fits_gz_cube(width: int, height: int, planes: int, *, in_extension: bool = False) -> bytes:
    """A gzip FITS cube of zeros: ``width*height*planes*4`` bytes decoded, tiny on disk;
    ``in_extension`` puts it in an IMAGE extension after an empty primary HDU."""
    header = fits_header(cube_cards(width, height, planes))
    if in_extension:
        ext = {"XTENSION": "'IMAGE   '", **cube_cards(width, height, planes), "PCOUNT": 0,
               "GCOUNT": 1}
        del ext["SIMPLE"]
        header = fits_header({"SIMPLE": True, "BITPIX": 8, "NAXIS": 0, "EXTEND": True}) + \
            fits_header(ext)
    nbytes = width * height * planes * 4
    nbytes += -nbytes % 2880
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = head.compress(header) + head.flush(zlib.Z_FULL_FLUSH) + _zero_stream(nbytes)
    crc = _checksum(zlib.crc32, 0, header, nbytes)
    size = (len(header) + nbytes) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + struct.pack("<II", crc, size)


def sparse_fits_cube(path: Path, width: int, height: int, planes: int, **extra: Any) -> Path:
    """A plain FITS cube written sparse (the data is a hole): any size, no disk, no time."""
    header = fits_header(cube_cards(width, height, planes, **extra))
    nbytes = width * height * planes * 4
    with path.open("wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + nbytes + (-nbytes % 2880))
    return path


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def peak_rss_delta(fn: Callable[[], Any], interval: float = 0.002) -> tuple[Any, int]:
    """Run ``fn()``; return its result and the peak RSS above the start, sampled in a thread."""
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    peak[0] = max(peak[0], rss_bytes())
    return result, peak[0] - base
