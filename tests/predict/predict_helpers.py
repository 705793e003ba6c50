"""Helpers for the prediction tests: a folder of everything an inbox collects, bundle copies."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A ~100-byte PNG whose header claims width x height 8-bit gray pixels (3.6 Gpx)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_messy_folder(root: Path, digits_folder: Path) -> dict[str, str | None]:
    """Nested folder of good and bad files -> {relative path: expected issue or None (good)}.

    ``locked.png`` is a good file that tests make unreadable with ``deny_read``.
    """
    pngs = sorted((digits_folder / "d3").glob("*.png"))[:3]
    digit = Image.open(pngs[0])
    good_png = pngs[0].read_bytes()
    jpeg = _encode(digit.convert("L"), "JPEG")
    corrupt = bytearray(good_png)
    idat = corrupt.index(b"IDAT") + 4
    corrupt[idat:idat + 40] = bytes(range(40))  # zlib stream garbage, trailer intact
    rgba = Image.fromarray(np.dstack([np.asarray(digit)] * 3 + [np.full(digit.size, 200,
                                                                        np.uint8)]), "RGBA")
    deep16 = Image.fromarray(np.asarray(digit).astype(np.uint16) * 257)
    files: dict[str, tuple[bytes, str | None]] = {
        "a/good1.png": (good_png, None),
        "a/good2.png": (pngs[1].read_bytes(), None),
        "a/deep/er/good3.jpg": (jpeg, None),
        "rgba.png": (_encode(rgba, "PNG"), None),
        "deep16.png": (_encode(deep16, "PNG"), None),
        "locked.png": (pngs[2].read_bytes(), None),
        "zero.png": (b"", "empty_file"),
        "a/corrupt.png": (bytes(corrupt), "decode_error"),
        "a/deep/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "notes.png": (b"meeting notes, not a picture\n" * 3, "format_mismatch"),
        "mislabelled.jpg": (good_png, "format_mismatch"),
        "bomb.png": (bomb_png(), "too_many_pixels"),
        "readme.txt": (b"not an image\n", "unsupported_format"),
    }
    expected: dict[str, str | None] = {}
    for rel, (data, issue) in files.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        expected[rel] = issue
    (root / "a" / "deep" / "gone.png").symlink_to(root / "nowhere.png")
    expected["a/deep/gone.png"] = "not_found"
    return expected


def deny_read(monkeypatch, name: str) -> None:
    """Make opening files called ``name`` fail with PermissionError (root reads anything)."""
    real_open = os.open

    def fake_open(target, *args, **kwargs):
        if Path(os.fsdecode(target)).name == name:
            raise PermissionError(13, "Permission denied", os.fsdecode(target))
        return real_open(target, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def outcome(report: dict, root: Path) -> dict[str, str | None]:
    """{relative path: issue or None} from a report, asserting each path appears once."""
    paths = [r["path"] for r in report["results"]] + [d["path"] for d in report["defects"]]
    assert len(paths) == len(set(paths)), "a file appears twice"
    out: dict[str, str | None] = {str(Path(r["path"]).relative_to(root)): None
                                  for r in report["results"]}
    out.update({str(Path(d["path"]).relative_to(root)): d["issue"] for d in report["defects"]})
    return out


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
