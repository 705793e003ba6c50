"""What the duplicate check of `train` costs: hashing every file of a ~5,000-file folder.

Per round, interleaved: discovery + split (the baseline every run pays), the duplicate check
(``data.check_duplicates``: sha256 of every file on 2 threads, as ``train`` runs it), and
reading + decoding every file once with ``io.read_image`` (what a training run does at the
least, once per file). The page cache is warmed first, so the figures are of hashing, not of
the disk. Reports the median (min-max) of seconds and of the within-round ratios.

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_duplicates.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from imgtriage.data import check_duplicates, discover, split_dataset
from imgtriage.io import read_image

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mstar-soc10"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def one_round(data: Path) -> dict[str, float]:
    ds, t_split = _timed(lambda: split_dataset(discover(data)))
    (_, dups), t_dups = _timed(lambda: check_duplicates(ds))
    _, t_decode = _timed(lambda: [read_image(s.path) for s in ds.samples])
    return {"files": len(ds.samples), "split_s": t_split, "dups_s": t_dups,
            "decode_s": t_decode, "dups_over_decode": t_dups / t_decode,
            "dups_over_split": t_dups / t_split, "val_copies": len(dups.val_copies),
            "test_copies": len(dups.test_copies), "conflicts": len(dups.conflicts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bytes_total = sum(p.stat().st_size for p in args.data.rglob("*") if p.is_file())
    for p in args.data.rglob("*"):  # warm the page cache
        if p.is_file():
            p.read_bytes()
    rounds = [one_round(args.data) for _ in range(args.rounds)]
    summary = {"data": str(args.data), "files": rounds[0]["files"], "bytes": bytes_total,
               "found": {k: rounds[0][k] for k in ("val_copies", "test_copies", "conflicts")}}
    for key in ("split_s", "dups_s", "decode_s", "dups_over_decode", "dups_over_split"):
        vals = [r[key] for r in rounds]
        summary[key] = [round(statistics.median(vals), 4), round(min(vals), 4),
                        round(max(vals), 4)]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
