"""Modality triage (RGB / infrared / SAR) with a statistics-first cascade, end to end.

1. Build a three-class folder from ``../shared/datasets``: CIFAR-10 photos as ``rgb``, SIRST
   frames as ``infrared``, MSTAR chips as ``sar``, every image resized to one size (64x64 PNG)
   so that size tells nothing; file modes are kept as found (L, RGB, RGBA).
2. Train a timm backbone (resnet18 by default) on it, 30% held out as a test split. With
   ``--pretrained FILE`` (a local .safetensors/.pth) it is transfer learning; without one --
   this machine has no network and no weights -- it trains from scratch and says so.
3. Build the cascade: logistic regression on image statistics answers what it is sure of on
   validation (``--target-accuracy``), the CNN the rest (``imgtriage.predict.build_cascade``).
4. Measure the CNN alone and the cascade on the test files, interleaved, ``--repeats``
   rounds: accuracy, per-class recall, coverage, share that skipped the CNN, and files/second
   as the median (min-max) of within-round ratios to the CNN alone.
5. Serve the cascade (``imgtriage serve`` on loopback), post test files, and check every answer
   equals ``Predictor``'s on the same bytes.

Everything lands in ``--out`` (``results.json`` holds every number the README quotes).

Usage (2 CPU cores; the full size takes a few minutes):
    .venv/bin/python examples/modality-triage/run.py
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "datasets"
# class name -> (folder under ../shared/datasets, file pattern)
SOURCES = {"rgb": ("cifar10-small", "*.jpg"), "infrared": ("sirst-infrared", "*.png"),
           "sar": ("mstar-soc10", "*.jpeg")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="../shared/datasets")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "examples" / "modality-triage")
    ap.add_argument("--per-class", type=int, default=420, help="images per class (SIRST has 427)")
    ap.add_argument("--size", type=int, default=64, help="side every image is resized to")
    ap.add_argument("--backbone", default="resnet18", help="a registered timm backbone")
    ap.add_argument("--pretrained", default=None,
                    help="local .safetensors/.pth weights of --backbone (transfer learning); "
                         "without it the backbone trains from scratch")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="training batch")
    ap.add_argument("--lr", type=float, default=None,
                    help="default: 3e-3 from scratch, 1e-3 with pretrained weights")
    ap.add_argument("--first-stage", default="logreg", help="logreg or gbt")
    ap.add_argument("--target-accuracy", type=float, default=0.97,
                    help="accuracy the first stage must be shown to reach on what it answers")
    ap.add_argument("--gate-confidence", type=float, default=0.95,
                    help="confidence of that showing (Clopper-Pearson); 0 trusts the observed "
                         "accuracy of a validation set of any size")
    ap.add_argument("--always-second-stage", default="sar",
                    help="comma-separated classes the CNN always answers ('' for none)")
    ap.add_argument("--predict-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timed rounds (the speed figures are medians over them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve-files", type=int, default=12, help="0 skips the service check")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# -- 1. the dataset ----------------------------------------------------------------------------
def build_dataset(shared: Path, root: Path, per_class: int, size: int, seed: int = 0
                  ) -> dict[str, int]:
    """``root/<class>/*.png`` at ``size`` x ``size``; reused when it already holds the data."""
    counts = {c: len(list((root / c).glob("*.png"))) for c in SOURCES}
    if all(n == per_class for n in counts.values()):
        return counts
    rng = np.random.default_rng(seed)
    for label, (folder, pattern) in SOURCES.items():
        files = sorted((shared / folder).rglob(pattern))
        if len(files) < per_class:
            raise SystemExit(f"{shared / folder} has {len(files)} files, fewer than "
                             f"--per-class {per_class}")
        out = root / label
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.png"):
            old.unlink()
        for i in sorted(rng.choice(len(files), per_class, replace=False)):
            with Image.open(files[i]) as img:
                img.load()
                small = img.resize((size, size), Image.Resampling.BILINEAR)
            small.save(out / f"{label}_{i:05d}.png")
        counts[label] = per_class
    return counts


# -- 2. the backbone ---------------------------------------------------------------------------
def weights_choice(pretrained: str | None, backbone: str) -> tuple[str | bool, str]:
    """The ``pretrained`` value to train with, and the sentence that says what it means."""
    if pretrained and Path(pretrained).is_file():
        return str(pretrained), f"transfer learning from {pretrained}"
    why = (f"--pretrained {pretrained} does not exist" if pretrained else
           "no --pretrained weights file given (this machine cannot download any)")
    return False, (f"NOTE: {why}: {backbone} trains from scratch. Pass a local "
                   f"{backbone} .safetensors/.pth file to --pretrained for transfer learning.")


def train_backbone(data: Path, run: Path, args: argparse.Namespace) -> tuple[Path, dict]:
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    pretrained, note = weights_choice(args.pretrained, args.backbone)
    print(note, flush=True)
    lr = args.lr or (1e-3 if pretrained else 3e-3)
    freeze = 1 if pretrained and args.epochs > 1 else 0  # the new head first, then everything
    cfg = TrainConfig(model=args.backbone, pretrained=pretrained, img_size=args.size,
                      epochs=args.epochs, batch_size=args.batch_size, lr=lr, test_frac=0.3,
                      in_chans=3, augment="flip", freeze_epochs=freeze, seed=args.seed,
                      num_threads=args.threads, checkpoint_every=0)
    res = train(data, run, cfg, quiet=True)
    info = {"model": args.backbone, "weights": note, "pretrained": pretrained or None,
            "lr": lr, "epochs": args.epochs, "train_seconds": round(res.seconds, 1),
            "val_metrics": res.metrics}
    print(f"trained {args.backbone} in {res.seconds:.0f}s: val accuracy "
          f"{res.metrics.get('val_accuracy')}", flush=True)
    return res.bundle_path, info


def split_files(run: Path, split: str) -> tuple[list[str], list[str]]:
    """Paths and labels of one split, as the training run wrote them to ``splits.csv``."""
    with (run / "splits.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    return [r["path"] for r in rows], [r["label"] for r in rows]


# -- 4. measuring ------------------------------------------------------------------------------
def score_report(report: dict, truth: dict[str, str], classes: list[str]) -> dict[str, Any]:
    """Accuracy (abstentions count as wrong), per-class recall, coverage, stage-1 share."""
    results = report["results"]
    seen = [r["path"] for r in results] + [d["path"] for d in report["defects"]]
    if sorted(seen) != sorted(truth):
        raise RuntimeError("the report does not hold every input file exactly once")
    hit = {c: [] for c in classes}
    for r in results:
        hit[truth[r["path"]]].append(r["class"] == truth[r["path"]])
    n = max(len(truth), 1)
    return {"files": len(truth), "results": len(results), "defects": len(report["defects"]),
            "accuracy": sum(sum(h) for h in hit.values()) / n,
            "recall": {c: (float(np.mean(h)) if h else None) for c, h in hit.items()},
            "coverage": sum(not r["abstained"] for r in results) / n,
            "skipped_cnn": sum(r.get("stage") == 1 for r in results) / n}


def measure(predictors: dict[str, Any], files: list[str], labels: list[str], batch_size: int,
            repeats: int) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Each predictor over ``files``, interleaved (the order rotates every round), ``repeats``
    rounds; per predictor its scores (the answers are the same every round), the median
    files/s with min-max, and the median (min-max) of its within-round speed ratio to the
    first predictor -- never the best round, which rewards whichever caught a quiet moment."""
    truth = dict(zip(files, labels, strict=True))
    names = list(predictors)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    scores: dict[str, dict] = {}
    rows: dict[str, list[dict]] = {}
    for k in range(max(1, repeats)):
        for name in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.perf_counter()
            report = predictors[name].predict_paths(files, batch_size=batch_size, workers=2)
            seconds[name].append(time.perf_counter() - t0)
            rows[name] = report["results"]
            scores.setdefault(name, score_report(report, truth, predictors[name].classes))
    base = seconds[names[0]]
    out = {}
    for name in names:
        rates = [len(files) / s for s in seconds[name]]
        ratios = [b / s for b, s in zip(base, seconds[name], strict=True)]
        out[name] = {**scores[name], "rounds": len(rates),
                     "files_per_s": float(np.median(rates)),
                     "files_per_s_range": [min(rates), max(rates)],
                     "speed_ratio": float(np.median(ratios)),
                     "speed_ratio_range": [min(ratios), max(ratios)]}
    return out, rows


def mistakes(rows: list[dict], truth: dict[str, str]) -> list[dict[str, Any]]:
    """The wrong answers: file, true class, answer, score and (for a cascade) stage."""
    return [{"path": r["path"], "truth": truth[r["path"]], "class": r["class"],
             "score": r["score"], "stage": r.get("stage")}
            for r in rows if r["class"] != truth[r["path"]]]


def serve_sample(rows: list[dict], n: int, seed: int) -> list[str]:
    """``n`` test files, half of them (as far as there are any) ones the cascade sent to the
    CNN, so the service check covers both stages."""
    rng = np.random.default_rng(seed)
    by_stage = {k: [r["path"] for r in rows if r.get("stage") == k] for k in (1, 2)}
    two = list(rng.permutation(by_stage[2])[: n // 2]) if by_stage[2] else []
    one = list(rng.permutation(by_stage[1])[: n - len(two)]) if by_stage[1] else []
    return sorted(str(p) for p in [*one, *two])


# -- 5. the service ----------------------------------------------------------------------------
def serve_check(bundle: Path, files: list[str], log: Path, timeout: float = 120.0
                ) -> dict[str, Any]:
    """Start ``imgtriage serve`` on loopback, post ``files`` (multipart), compare each answer
    with ``Predictor.predict_bytes`` on the same bytes; stop the server."""
    import httpx

    from imgtriage.predict import Predictor
    from imgtriage.serve.process import start_service

    with start_service(bundle, args=["--threads", "1"], log=log, timeout=timeout) as svc:
        url = svc.url
        blobs = [Path(f).read_bytes() for f in files]
        names = [Path(f).name for f in files]
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/classify", timeout=60, files=[
            ("files", (n, b, "image/png")) for n, b in zip(names, blobs, strict=True)])
        seconds = time.perf_counter() - t0
        r.raise_for_status()
        served = r.json()["results"]
        model = httpx.get(url + "/v1/model", timeout=10).json()
    local = Predictor.load(bundle).predict_bytes(blobs, names)
    keys = ("path", "class", "class_id", "abstained", "stage")
    same = [all(s.get(k) == p.get(k) for k in keys) and abs(s["score"] - p["score"]) < 1e-5
            for s, p in zip(served, local, strict=True)]
    return {"url": url, "files": len(files), "request_seconds": round(seconds, 3),
            "equal_to_predictor": int(sum(same)), "all_equal": all(same),
            "served_stage1": sum(s.get("stage") == 1 for s in served),
            "served_stage2": sum(s.get("stage") == 2 for s in served),
            "bundle_sha256": model.get("bundle_sha256"),
            "examples": [{k: s.get(k) for k in ("path", "class", "score", "stage")}
                         for s in served[:4]]}


# -- the recipe --------------------------------------------------------------------------------
def _table(by: dict[str, dict], classes: list[str]) -> str:
    lines = ["| predictor | accuracy | " + " | ".join(f"recall {c}" for c in classes)
             + " | coverage | files/s, median | vs CNN, median (min-max) | skipped the CNN |",
             "|---|---:|" + "---:|" * len(classes) + "---:|---:|---:|---:|"]
    for name, r in by.items():
        lo, hi = r["speed_ratio_range"]
        lines.append(f"| {name} | {r['accuracy']:.4f} | " + " | ".join(
            f"{r['recall'][c]:.4f}" for c in classes) + f" | {r['coverage']:.1%} | "
            f"{r['files_per_s']:.0f} | {r['speed_ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | "
            f"{r['skipped_cnn']:.1%} |")
    return "\n".join(lines)


def _names(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the whole recipe; returns (and writes to ``OUT/results.json``) every number."""
    args = parse_args(argv)
    import torch

    from imgtriage.predict import Predictor
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts = build_dataset(args.shared, out / "data", args.per_class, args.size, args.seed)
    print(f"dataset {out / 'data'}: {counts} at {args.size}x{args.size}", flush=True)
    stage2, train_info = train_backbone(out / "data", out / "cnn", args)
    cas = build_cascade(stage2, out / "data", out / "cascade",
                        CascadeConfig(first_stage=args.first_stage,
                                      target_accuracy=args.target_accuracy,
                                      gate_confidence=args.gate_confidence,
                                      always_second_stage=_names(args.always_second_stage),
                                      workers=2))
    v = cas.validation
    print(f"cascade built in {cas.seconds:.0f}s: gate {v['threshold']}, answers "
          f"{v['accepted_share']:.1%} of validation at accuracy {v['accepted_accuracy']}",
          flush=True)
    files, labels = split_files(out / "cnn", "test")
    cnn = Predictor.load(stage2, num_threads=args.threads)
    cascade = Predictor.load(cas.bundle_path, num_threads=args.threads)
    name = f"cascade ({args.first_stage} first)"
    by_predictor, rows = measure({"cnn alone": cnn, name: cascade}, files, labels,
                                 args.predict_batch, args.repeats)
    print(_table(by_predictor, cnn.classes), flush=True)
    truth = dict(zip(files, labels, strict=True))
    wrong = {k: mistakes(v, truth) for k, v in rows.items()}
    routed = [r for r in rows[name] if truth[r["path"]] in _names(args.always_second_stage)]
    v["test_always_second_stage"] = {  # every test file of those classes went to the CNN?
        "files": len(routed), "to_stage2": sum(r.get("stage") == 2 for r in routed)}
    served = None
    if args.serve_files > 0:
        served = serve_check(cas.bundle_path, serve_sample(rows[name], args.serve_files,
                                                           args.seed), out / "serve.log")
        print(f"service: {served['equal_to_predictor']}/{served['files']} answers equal to "
              f"Predictor's ({served['served_stage1']} by the first stage, "
              f"{served['served_stage2']} by the CNN)", flush=True)
    results = {"command": "examples/modality-triage/run.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "dataset": {"root": str(out / "data"), "counts": counts, "size": args.size},
               "cnn": {**train_info, "bundle": str(stage2)},
               "cascade": {"bundle": str(cas.bundle_path), "build_seconds": round(cas.seconds, 1),
                           "validation": v},
               "test": {"files": len(files), "batch_size": args.predict_batch,
                        "threads": args.threads, "by_predictor": by_predictor, "mistakes": wrong},
               "serve": served, "classes": cnn.classes,
               "wall_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wall time {results['wall_seconds']:.0f}s -> {out / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()
