"""Helpers shared by tests in several folders (import as ``from shared_helpers import ...``).

Kept out of ``conftest.py``: several folders have their own conftest, and ``from conftest import``
would pick whichever one pytest imported first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of ../shared/datasets/<name>, or skip the test cleanly when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} not present (tests that need ../shared skip without it)")
    return path


def write_digits_folder(root: Path, per_class: int = 30, size: int = 32, seed: int = 0,
                        classes: tuple[int, ...] = tuple(range(10))) -> Path:
    """scikit-learn digits as class folders of real grayscale PNGs at ``size`` pixels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(d.target == c))[:per_class]
        out = root / f"d{c}"
        out.mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = (d.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img).resize((size, size), Image.BILINEAR).save(out / f"{i:05d}.png")
    return root


def without_graph(bundle: Path, dest: Path, reason: str = "removed by a test") -> Path:
    """A copy of ``bundle`` as if its ONNX export had failed: no model.onnx, the reason kept."""
    from imgtriage.bundle import load_bundle, save_bundle
    from imgtriage.bundle.graph import not_exported

    b = load_bundle(bundle)
    manifest = {**b.manifest, "onnx": not_exported(reason)}
    return save_bundle(dest, manifest, b.state_dict())


def png16_bytes(array: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG of a (H, W, 3|4) uint16 array, its rows filtered with each of
    the five PNG filters in turn (None, Sub, Up, Average, Paeth), as encoders mix them.
    Pillow cannot write these (it keeps 8 bits of each sample), so they are built here."""
    import struct
    import zlib

    h, w, c = array.shape
    bpp = 2 * c
    rows = [np.frombuffer(array[y].astype(">u2").tobytes(), np.uint8).astype(np.int32)
            for y in range(h)]
    out = bytearray()
    prev = np.zeros(w * bpp, np.int32)
    for y, row in enumerate(rows):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        kind = y % 5
        if kind == 4:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        else:
            pred = (0 * row, left, prev, (left + prev) // 2)[kind]
        out += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(out)))
            + chunk(b"IEND", b""))
