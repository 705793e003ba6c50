"""What the out-of-distribution rule costs end to end: files/s of ``imgtriage predict``'s call
(``runner.run_batch``: decode, preprocess, the graph, the decision, the report) with a bundle
as ``imgtriage train`` writes it (its OOD score in the ONNX graph) against the same bundle
without the OOD rule (the baseline), in interleaved rounds on the same files.

The baseline is made here from the bundle itself: ``calibrate_bundle(..., ood=False)`` on its
own validation split (``RUN/splits.csv``), which keeps the weights and the temperature and
attaches a graph with logits only. Both are loaded before the clock starts (the bundle's
default backend and precision), and each round times both over the same files in rotating
order. ``bench/bench_ood_stages_cost.py`` times the graphs alone.

Usage (timed: under the bench lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ood_e2e_cost.py \\
        RUN/bundle FOLDER --limit 4000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".fits", ".bmp", ".webp"}


def _twin(bundle: Path, out: Path) -> Path:
    """The same model and temperature with no OOD rule, calibrated on the run's val split."""
    from imgtriage.predict.assess import calibrate_bundle

    splits = bundle.parent / "splits.csv"
    if not splits.exists():
        raise SystemExit(f"{splits} not found: pass a bundle inside a train run directory")
    calibrate_bundle(bundle, splits, split="val", ood=False, out=out)
    return out


def _files(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images under {folder}")
    return files[:limit]


def _rate(predictor: Any, files: list[Path], tmp: Path
          ) -> tuple[float, float, dict[str, int]]:
    """Files/s of run_batch over ``files`` (wall time), files per CPU-second of this process
    (every thread: decoding, the graph, the store), and the count of each reason."""
    from imgtriage.predict.runner import run_batch

    out = tmp / "out.jsonl"
    t0, c0 = time.perf_counter(), time.process_time()
    run = run_batch(predictor, files, output=out)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if run.n_results != len(files):
        raise SystemExit(f"expected {len(files)} results, got {run}")
    reasons: dict[str, int] = {}
    with out.open() as f:
        for line in f:
            r = json.loads(line).get("reason")
            reasons[str(r)] = reasons.get(str(r), 0) + 1
    return len(files) / dt, len(files) / cpu, reasons


def main() -> None:
    from imgtriage.predict import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("folder", type=Path, help="images to classify (e.g. the test split)")
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    files = _files(args.folder, args.limit)
    with tempfile.TemporaryDirectory(prefix="imgtriage-ood-e2e-") as d:
        tmp = Path(d)
        base = _twin(args.bundle, tmp / "no-ood")
        arms = {"with OOD": Predictor.load(args.bundle), "without OOD": Predictor.load(base)}
        for name, p in arms.items():
            ood = p.policy.ood
            print(f"{name}: backend {p.runtime.backend}, precision {p.runtime.precision}, "
                  f"OOD rule {ood['method'] if ood else None}", flush=True)
        if arms["without OOD"].policy.ood is not None or arms["with OOD"].policy.ood is None:
            raise SystemExit("the bundle has no OOD rule, or the baseline kept one")
        names = list(arms)
        wall: list[float] = []
        cpu: list[float] = []
        for r in range(args.rounds):
            order = names[r % 2:] + names[:r % 2]
            got = {k: _rate(arms[k], files, tmp) for k in order}
            wall.append(got["with OOD"][0] / got["without OOD"][0])
            cpu.append(got["with OOD"][1] / got["without OOD"][1])
            print(f"round {r}: " + ", ".join(f"{k} {v[0]:.0f} files/s ({v[1]:.0f} per CPU-s)"
                                             for k, v in got.items())
                  + f"; reasons with OOD {got['with OOD'][2]}", flush=True)
        for label, v in (("files/s", wall), ("files per CPU-s", cpu)):
            print(f"with OOD / without, {label}: median {statistics.median(v):.3f} "
                  f"({min(v):.3f}-{max(v):.3f}) over {len(v)} rounds, {len(files)} files")


if __name__ == "__main__":
    main()
