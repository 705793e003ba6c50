"""Semi-supervised training on MSTAR SOC-10: K labels per class with and without the rest of
the training chips as unlabelled images (``--unlabeled``), in the same run.

Data: ``../shared/datasets/mstar-soc10`` (128x128 SAR chips, 10 classes; train at 17 deg,
test at 15 deg depression). For every K in ``--per-class`` and every seed in ``--seeds``,
K train chips per class are drawn at random (seeded) as the labels; the other train chips
(up to ``--unlabeled-limit``) are linked into a folder *without their labels*. Two runs then
share everything (model, preprocessing, augmentation, steps, seed) except the unlabelled
folder:

* ``labels``: ``imgtriage train labels.csv`` (the K x 10 labels only);
* ``semi``: the same plus ``--unlabeled FOLDER`` (``--semi-method``, default fixmatch_ema,
  batch norm's running statistics from labels and weak views only: ``--bn-stats clean``).

Both train with ``--val-frac 0`` (every label trains; the last epoch is kept, the test set is
never looked at during training) for ``--steps`` optimiser steps, and are scored on the 15 deg
test chips (all 2,425, or ``--test-limit`` per class). The two arms run back to back for each
seed (interleaved), so machine load hits both alike. The summary gives, per K and arm, the
median (min-max) test accuracy over seeds and the median within-seed gain of ``semi``.

Usage (the CPU is shared: take the lock; at the default 1,200 steps one ``semi`` run took
11-25 min on one thread of the shared 2 cores, a ``labels`` run 2-5 min):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_semisup.py \\
        --per-class 10,25 --seeds 0,1,2 --threads 1 --out /tmp/semibench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# ../shared/datasets from the project root (a worktree under wt/ looks one level higher)
SHARED = next((p / "shared" / "datasets" for p in (REPO.parent, REPO.parent.parent)
               if (p / "shared" / "datasets").is_dir()), REPO.parent / "shared" / "datasets")


def _chips(root: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(c.iterdir()) for c in sorted(root.iterdir()) if c.is_dir()}


def make_split(train: dict[str, list[Path]], k: int, seed: int, limit: int, out: Path
               ) -> tuple[Path, Path, int]:
    """labels.csv with k chips per class; a flat folder linking (up to ``limit``) others."""
    from imgtriage.data import write_manifest

    rng = np.random.default_rng(seed)
    paths, labels, rest = [], [], []
    for c, files in train.items():
        order = rng.permutation(len(files))
        paths += [str(files[i]) for i in order[:k]]
        labels += [c] * k
        rest += [files[i] for i in order[k:]]
    rest = [rest[i] for i in rng.permutation(len(rest))][:limit or None]
    box = out / "unlabeled"
    box.mkdir(parents=True, exist_ok=True)
    for f in box.iterdir():
        f.unlink()
    for i, f in enumerate(rest):  # names carry no label: <index>.jpeg
        os.symlink(f, box / f"{i:05d}{f.suffix}")
    return write_manifest(out / "labels.csv", paths, labels), box, len(rest)


def _config(args, seed: int, unlabeled: str, n_labels: int):
    from imgtriage.train.config import TrainConfig

    steps_per_epoch = math.ceil(n_labels / args.batch_size)
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    kwargs = ({"widths": [int(w) for w in args.widths.split(",")],
               "convs_per_block": args.convs} if args.model == "crop_cnn" else {})
    return TrainConfig(
        model=args.model, model_kwargs=kwargs, pretrained=args.pretrained,
        freeze_stages=args.freeze_stages,
        img_size=args.img_size, resize="shorter_crop", crop_pct=args.crop_pct,
        scaling=args.scaling, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
        augment=args.augment, val_frac=0.0, seed=seed,
        num_threads=args.threads, checkpoint_every=0, unlabeled=unlabeled,
        modality=args.modality,
        semi_method=args.method, semi_steps=0, unlabeled_ratio=args.ratio,
        pseudo_threshold=args.threshold, unlabeled_weight=args.weight,
        pseudo_threshold_mode=args.threshold_mode, semi_bn_stats=args.bn_stats,
        drop_rate=args.drop_rate, ema_decay=args.ema, label_smoothing=0.0)


class TestSet:
    """The 15 deg test chips, decoded once per preprocessing."""

    def __init__(self, root: Path, per_class: int) -> None:
        self.paths, self.labels = [], []
        for c, files in _chips(root).items():
            files = files[:per_class or None]
            self.paths += [str(f) for f in files]
            self.labels += [c] * len(files)
        self._cache: dict[str, np.ndarray] = {}

    def accuracy(self, bundle: Path) -> float:
        from concurrent.futures import ThreadPoolExecutor

        from imgtriage.data import load_input
        from imgtriage.predict import PredictOptions, Predictor

        pred = Predictor.load(bundle, backend="torch")
        key = json.dumps(pred.spec.to_dict(), sort_keys=True)
        if key not in self._cache:
            with ThreadPoolExecutor(2) as pool:
                self._cache[key] = np.stack(list(pool.map(
                    lambda p: load_input(p, pred.spec)[0], self.paths)))
        x, ids = self._cache[key], []
        for i in range(0, len(x), 256):
            rows = pred.rows_for_inputs(x[i:i + 256], self.paths[i:i + 256],
                                        PredictOptions(abstain=False))
            ids += [r["class_id"] for r in rows]
        got = np.asarray(pred.classes)[ids]
        return float(np.mean(got == np.asarray(self.labels)))


def _run_arm(args, arm: str, labels: Path, box: Path, seed: int, n_labels: int,
             out: Path, test: TestSet) -> dict:
    from imgtriage.train.run import train

    cfg = _config(args, seed, str(box) if arm == "semi" else "", n_labels)
    t0 = time.perf_counter()
    res = train(labels, out, cfg, quiet=True)
    seconds = time.perf_counter() - t0
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    acc = test.accuracy(res.bundle_path)
    row = {"arm": arm, "seed": seed, "test_accuracy": acc, "train_seconds": round(seconds, 1),
           "epochs": cfg.epochs, "train_accuracy_last": log[-1]["train_accuracy"]}
    if arm == "semi":
        row.update({k: round(float(np.median([r[k] for r in log])), 1)
                    for k in ("labeled_img_per_s", "unlabeled_img_per_s")})
        row["pseudo_label_rate_last"] = round(log[-1]["pseudo_label_rate"], 3)
    print(json.dumps(row), flush=True)
    return row


def _summary(rows: list[dict]) -> dict:
    out: dict = {}
    for k in sorted({r["k"] for r in rows}):
        at = [r for r in rows if r["k"] == k]
        s = {}
        for arm in ("labels", "semi"):
            accs = [r["test_accuracy"] for r in at if r["arm"] == arm]
            if accs:
                s[arm] = {"median": statistics.median(accs), "min": min(accs),
                          "max": max(accs), "seeds": len(accs)}
        gains = [r["test_accuracy"] - b["test_accuracy"] for r in at if r["arm"] == "semi"
                 for b in at if b["arm"] == "labels" and b["seed"] == r["seed"]]
        if gains:
            s["gain"] = {"median": statistics.median(gains), "min": min(gains),
                         "max": max(gains)}
        out[f"{k}/class"] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "mstar-soc10")
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-bench-semisup"))
    ap.add_argument("--per-class", default="10,25", help="labels per class (comma-separated)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default="labels,semi")
    ap.add_argument("--steps", type=int, default=1200, help="optimiser steps per run")
    ap.add_argument("--batch-size", type=int, default=32, help="labelled images per step")
    ap.add_argument("--ratio", type=int, default=3, help="unlabelled images per labelled one")
    ap.add_argument("--method", default="fixmatch_ema")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--threshold-mode", default="fixed", help="fixed or flex (FlexMatch)")
    ap.add_argument("--bn-stats", default="clean", help="clean or all (--semi-bn-stats)")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--unlabeled-limit", type=int, default=0, help="0 = every other chip")
    ap.add_argument("--test-limit", type=int, default=0, help="test chips per class; 0 = all")
    ap.add_argument("--img-size", type=int, default=48)
    ap.add_argument("--crop-pct", type=float, default=0.6875, help="88 of 128 px")
    ap.add_argument("--model", default="crop_cnn",
                    help="crop_cnn (with --widths/--convs) or e.g. timm:tf_efficientnet_lite0")
    ap.add_argument("--pretrained", default="none", help="none, auto (installed weights), a path")
    ap.add_argument("--freeze-stages", type=int, default=0,
                    help="stem + first N backbone stages frozen (timm models)")
    ap.add_argument("--widths", default="16,32,64,128")
    ap.add_argument("--convs", type=int, default=1)
    ap.add_argument("--scaling", default="percentile")
    ap.add_argument("--augment", default="weak")
    ap.add_argument("--modality", default="generic", help="label-preserving flips (--modality)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--drop-rate", type=float, default=0.2, help="dropout before the head")
    ap.add_argument("--ema", type=float, default=0.99, help="EMA of the weights (0 = off)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    train_chips = _chips(args.data / "train")
    test = TestSet(args.data / "test", args.test_limit)
    rows: list[dict] = []
    meta = {"args": {k: str(v) for k, v in vars(args).items()},
            "loadavg_start": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for k in [int(x) for x in args.per_class.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            base = args.out / f"k{k}-s{seed}"
            labels, box, n_unl = make_split(train_chips, k, seed, args.unlabeled_limit, base)
            print(f"K={k}/class seed {seed}: {k * len(train_chips)} labels, {n_unl} unlabelled, "
                  f"{len(test.paths)} test chips", flush=True)
            for arm in args.arms.split(","):
                row = _run_arm(args, arm, labels, box, seed, k * len(train_chips),
                               base / arm, test)
                rows.append({"k": k, "n_unlabeled": n_unl, **row,
                             "loadavg": round(os.getloadavg()[0], 2)})
                (args.out / "results.json").write_text(json.dumps(
                    {**meta, "runs": rows, "summary": _summary(rows)}, indent=2))
    print(json.dumps(_summary(rows), indent=2))
    print(f"-> {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
