"""Milliseconds per photo of the file -> tensor step: the 8-bit fast path of ``to_input``
against the float planes it replaces for 8-bit images, and the decode before either.

The photos are CIFAR-10 pictures from ../shared/datasets upscaled to 256-500 px JPEGs (as in
bench_predict.py); the spec is the ResNet one there (shorter side to 256, centre crop 224,
ImageNet mean/std). Each round times, in a rotating order, over every photo: the decode
(``load_record``), ``to_input`` (the fast path) and ``float_input`` (the float planes) on the
decoded arrays. Wall and CPU time of this one thread; medians (min-max) over ``--rounds``
rounds of ms per photo and of the within-round ratio fast / float. Run it under the bench
lock and say the load:

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_preprocess.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _mmm(v: list[float]) -> str:
    return f"{statistics.median(v):6.3f} ({min(v):.3f}-{max(v):.3f})"


def main() -> None:
    from bench_predict import make_jpegs
    from imgtriage.data.preprocess import PreprocessSpec, float_input, load_record, to_input

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    if a.rounds < 3:
        sys.exit("--rounds must be >= 3: the figures are medians of within-round ratios")
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    spec = PreprocessSpec(in_chans=3, size=(224, 224), resize="shorter_crop",
                          crop_pct=224 / 256, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225))
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as d:
        files = make_jpegs(Path(d), a.files)
        arrays = [load_record(f, spec).array for f in files]
        rows: dict[str, Callable[[], object]] = {
            "decode (load_record)": lambda: [load_record(f, spec) for f in files],
            "to_input, 8-bit fast path": lambda: [to_input(x, spec) for x in arrays],
            "float_input, float planes": lambda: [float_input(x, spec) for x in arrays],
        }
        for fn in rows.values():
            fn()
        wall: dict[str, list[float]] = {k: [] for k in rows}
        cpu: dict[str, list[float]] = {k: [] for k in rows}
        keys = list(rows)
        for r in range(a.rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                t0, c0 = time.perf_counter(), time.thread_time()
                rows[k]()
                cpu[k].append((time.thread_time() - c0) / len(files) * 1e3)
                wall[k].append((time.perf_counter() - t0) / len(files) * 1e3)
    for k in keys:
        print(f"  {k:28s} wall ms/photo {_mmm(wall[k])}  CPU ms/photo {_mmm(cpu[k])}")
    fast, ref = keys[1], keys[2]
    for name, t in (("wall", wall), ("CPU", cpu)):
        ratio = [f / g for f, g in zip(t[fast], t[ref], strict=True)]
        print(f"  fast / float, {name:4s}: {_mmm(ratio)}")
    diff = max(float(np.abs(to_input(x, spec) - float_input(x, spec)).max()) for x in arrays)
    print(f"  largest |fast - float| over the photos (normalised units): {diff:.2e}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
