"""The decode budget against hostile files: peak memory and time to refuse (or read) each.

Each file is built in a temporary folder (small on disk, or sparse) and read with
``imgtriage.io.try_read_image`` under the default ``ReadPolicy``, then through
``data.load_input`` (what predict/serve/train run); the peak resident memory above the start is
sampled in a thread. ``--rounds`` interleaved rounds; the figure is the median (min-max).

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_decode_budget.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hostile_files import (
    fits_gz_cube,
    peak_rss_delta,
    png_bomb,
    sparse_fits_cube,
    tiff_of_pages,
)
from imgtriage.data.preprocess import PreprocessSpec, load_input
from imgtriage.errors import ImageReadError
from imgtriage.io import try_read_image


def build(tmp: Path) -> dict[str, Path]:
    files = {
        "png_16bit_rgba_10000x10000": ("bomb.png", png_bomb()),
        "png_8bit_rgb_at_budget_4000x4000": ("ok.png", png_bomb(4000, 4000, bit_depth=8,
                                                                color_type=2)),
        "tiff_50000_1x1_pages": ("pages.tif", tiff_of_pages(50_000)),
        "fits_gz_cube_1000x1000x300": ("cube.fits.gz", fits_gz_cube(1000, 1000, 300)),
        "fits_gz_ext_cube_1000x1000x300": ("ext.fits.gz", fits_gz_cube(1000, 1000, 300,
                                                                      in_extension=True)),
    }
    out = {}
    for key, (name, data) in files.items():
        (tmp / name).write_bytes(data)
        out[key] = tmp / name
    out["fits_scaled_cube_2000x2000x100"] = sparse_fits_cube(tmp / "scaled.fits", 2000, 2000,
                                                             100, BSCALE=2.0)
    return out


def measure(path: Path) -> dict:
    t0 = time.perf_counter()
    rec, read_peak = peak_rss_delta(lambda: try_read_image(path))
    read_s = time.perf_counter() - t0
    spec = PreprocessSpec.default_for(3, (224, 224))

    def full() -> str:
        try:
            load_input(path, spec)
            return "ok"
        except ImageReadError as exc:
            return exc.defect.issue

    t0 = time.perf_counter()
    outcome, full_peak = peak_rss_delta(full)
    return {"issue": getattr(rec, "issue", "ok"), "load_input": outcome,
            "read_s": read_s, "read_peak_mib": read_peak / 2**20,
            "load_input_s": time.perf_counter() - t0, "load_input_peak_mib": full_peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        files = build(Path(tmp))
        for _ in range(args.rounds):
            for key, path in files.items():
                rows.setdefault(key, []).append(measure(path))
    summary = {}
    for key, runs in rows.items():
        line = {"issue": runs[0]["issue"], "load_input": runs[0]["load_input"]}
        for metric in ("read_s", "read_peak_mib", "load_input_s", "load_input_peak_mib"):
            vals = [r[metric] for r in runs]
            line[metric] = f"{statistics.median(vals):.3g} ({min(vals):.3g}-{max(vals):.3g})"
        summary[key] = line
        print(f"{key:36s} {json.dumps(line)}")
    print(f"loadavg {load:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
