"""What the confidence cap of the temperature fit does on new data: for each trained bundle,
the temperature fitted on its own validation split by plain NLL (the baseline) and with the
cap (``TemperatureScaler(cap_confidence=True)``, the default: the mean top-class confidence on
validation at most ``(right + 1) / (n + 2)``), each scored on the bundle's test images, beside
the test split's own best temperature (an oracle, not deployable).

The logits are the bundle's raw logits (torch backend, no temperature, no prior correction),
from the run's ``splits.csv`` (val) and a test folder whose sub-folders are the classes,
``splits`` (the run's own test split) or ``fashion`` (the Fashion-MNIST test files
``bench_ood._fashion`` writes, labels from the installed idx files). Nothing is timed.

Usage:
    nice -n 19 .venv/bin/python bench/bench_temperature_cap.py \\
        RUN/bundle:TEST_FOLDER [RUN2/bundle:fashion ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _test_items(spec: str, bundle: Path, classes: list[str]) -> list[tuple[str, str]]:
    if spec == "splits":
        rows = csv.DictReader((bundle.parent / "splits.csv").open())
        return [(r["path"], r["label"]) for r in rows if r["split"] == "test"]
    if spec == "fashion":  # the files and labels bench_ood wrote beside the run
        import bench_ood

        _, test = bench_ood._fashion(bundle.parent.parent / "fashion-data", 600)
        return [(str(f), c) for f, c in test]
    return [(str(f), f.parent.name) for f in sorted(Path(spec).rglob("*"))
            if f.is_file() and f.parent.name in classes]


def _logits(predictor, items: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    from imgtriage.data.discovery import Sample
    from imgtriage.predict.assess import collect_logits

    got = collect_logits(predictor, [Sample(path=p, label=c) for p, c in items],
                         batch_size=128)
    return np.asarray(got.logits, np.float64), np.asarray(got.labels)


def _scored(zt: np.ndarray, yt: np.ndarray, t: float) -> dict[str, float]:
    from imgtriage.evaluate import nll_at_temperature, softmax
    from imgtriage.evaluate.metrics import expected_calibration_error

    return {"T": round(t, 4), "test_nll": round(nll_at_temperature(zt, yt, t), 4),
            "test_ece": round(expected_calibration_error(softmax(zt, t), yt, 15), 4)}


def one(spec: str) -> dict:
    from imgtriage.evaluate import TemperatureScaler
    from imgtriage.predict import Predictor

    bundle_s, test = spec.rsplit(":", 1)
    bundle = Path(bundle_s)
    p = Predictor.load(bundle, backend="torch")
    rows = list(csv.DictReader((bundle.parent / "splits.csv").open()))
    zv, yv = _logits(p, [(r["path"], r["label"]) for r in rows if r["split"] == "val"])
    zt, yt = _logits(p, _test_items(test, bundle, p.classes))
    plain = TemperatureScaler(cap_confidence=False).fit(zv, yv)
    capped = TemperatureScaler().fit(zv, yv)
    oracle = TemperatureScaler(cap_confidence=False).fit(zt, yt)
    return {"bundle": str(bundle), "n_val": len(yv),
            "val_right": int((zv.argmax(1) == yv).sum()), "n_test": len(yt),
            "test_accuracy": round(float((zt.argmax(1) == yt).mean()), 4),
            "cap": capped.confidence_cap_, "capped": capped.capped_,
            "plain": _scored(zt, yt, plain.temperature_),
            "with cap": _scored(zt, yt, capped.temperature_),
            "oracle": _scored(zt, yt, oracle.temperature_)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+",
                    help="BUNDLE:TEST_FOLDER, BUNDLE:splits or BUNDLE:fashion")
    args = ap.parse_args()
    print("| bundle | val right / n | cap | T plain -> capped (oracle) | test NLL plain -> capped "
          "(oracle) | test ECE plain -> capped (oracle) |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.bundles:
        r = one(spec)
        print(json.dumps(r), file=sys.stderr)
        a, b, o = r["plain"], r["with cap"], r["oracle"]
        cap = "none (errors)" if r["cap"] is None else f"{r['cap']:.4f}"
        print(f"| {Path(r['bundle']).parent.name} | {r['val_right']} / {r['n_val']} | "
              f"{cap} | {a['T']:.3f} -> {b['T']:.3f} ({o['T']:.3f}) | "
              f"{a['test_nll']:.4f} -> {b['test_nll']:.4f} ({o['test_nll']:.4f}) | "
              f"{100 * a['test_ece']:.2f} -> {100 * b['test_ece']:.2f} "
              f"({100 * o['test_ece']:.2f})% |", flush=True)


if __name__ == "__main__":
    main()
