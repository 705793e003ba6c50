"""What `imgtriage train DIR` gives with no options, before and after ``--model auto``
became the default and chose the whole from-scratch recipe (issues 14 and 15).

For each task and arm it trains through the library's ``train()`` (the path the CLI takes),
loads the bundle and scores the held-out test split with the bundle's default temperature:
test accuracy (top class, nothing abstained), ECE with the bundle's temperature and at T = 1,
and the training wall time; each row also records what the run chose and why (run.json).

Arms (the same seed, one after another in one process):

- ``before``: the previous defaults, spelled out: ``crop_cnn`` at its default 64 px (the
  images' side for smaller ones is *not* used: the model's default), ``--scaling dtype``,
  no augmentation, 10 epochs at lr 1e-3, no label smoothing, no weight average;
- ``default``: ``TrainConfig()`` -- no option at all (now ``--model auto``);
- ``scratch``: ``--pretrained none`` only (auto's from-scratch route where it would pick a
  pretrained backbone: grey images of 96 px or more, e.g. MSTAR);
- ``planned``: ``scratch`` with the side, widths and epochs a quiet machine plans for MSTAR
  given explicitly (a probe slowed by other jobs plans fewer; scaling, augmentation and
  regularisation still chosen by the recipe).

Tasks: ``mstar`` (``../shared/datasets/mstar-soc10``: train 17 deg, test 15 deg, 128 px grey
JPEG chips), ``fashion`` (Fashion-MNIST, the class-balanced 600-per-class training subset of
``bench_ood.py`` and the official 10,000 test images, 28 px), ``digits`` (scikit-learn's
8x8 digits, 1,297 train / 500 test, fixed split).

Untimed (accuracy work: run it with ``nice -n 19``; the wall times are for orientation)::

    nice -n 19 .venv/bin/python bench/bench_defaults.py --tasks digits,fashion,mstar \\
        --arms before,default --out /tmp/defaults
    .venv/bin/python bench/bench_defaults.py --merge /tmp/defaults/rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ood import MSTAR, _files, _id_metrics, _inputs, _scores
from bench_ood import _fashion as fashion_subset

BEFORE = dict(model="crop_cnn", scaling="dtype", augment="none")
# ``planned``: the from-scratch route with the side, widths and epochs a quiet 2-core machine
# plans for MSTAR (deep_cnn at half width, 64 px, SCRATCH_MIN_EPOCHS), given explicitly so a
# probe slowed by other jobs cannot shrink them; everything else left to the recipe
PLANNED = {"pretrained": "none", "img_size": 64, "model_kwargs": {"widths": [16, 32, 64, 128]},
           "epochs": 24}
ARMS = {"before": BEFORE, "default": {}, "scratch": {"pretrained": "none"}, "planned": PLANNED}


def _digits(out: Path) -> tuple[Path, list[tuple[Path, str]]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    test = []
    for k, i in enumerate(order):
        split = "test" if k < 500 else "train"
        c = f"d{d.target[i]}"
        p = out / split / c / f"{i:04d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8)).save(p)
        if split == "test":
            test.append((p, c))
    return out / "train", test


def task_data(task: str, out: Path) -> tuple[Path, list[tuple[Path, str]]]:
    if task == "mstar":
        return MSTAR / "train", [(f, c) for c, fs in _files(MSTAR / "test").items()
                                 for f in fs]
    if task == "fashion":
        return fashion_subset(out / "fashion-data", 600)
    if task == "digits":
        return _digits(out / "digits-data")
    raise SystemExit(f"unknown task {task}")


def _chunked_scores(p: Any, files: list[Path], chunk: int = 128) -> dict[str, np.ndarray]:
    """bench_ood's scores, 128 images at a time (a 224-px backbone on 2,425 chips in one
    batch needs > 20 GB)."""
    def scores(x: np.ndarray) -> dict[str, Any]:
        if p.policy.ood is None:  # an uncalibrated bundle without an OOD rule: logits only
            return {"logits": p.forward(x, p.policy)[0], "bundle": None}
        return _scores(p, x)

    parts = [scores(_inputs(p, files[i:i + chunk])) for i in range(0, len(files), chunk)]
    return {k: (np.concatenate([q[k] for q in parts]) if parts[0][k] is not None else None)
            for k in parts[0]}


def run(task: str, arm: str, seed: int, out: Path, threads: int,
        rescore: bool = False, backend: str = "auto") -> dict[str, Any]:
    from imgtriage.predict import Predictor
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import TrainResult, train

    data, test = task_data(task, out)
    cfg = TrainConfig(**ARMS[arm], seed=seed, num_threads=threads)
    work = out / f"{task}-{arm}-s{seed}"
    t0 = time.perf_counter()
    if rescore and (work / "bundle" / "manifest.json").is_file():  # scored, not retrained
        manifest = json.loads((work / "bundle" / "manifest.json").read_text())
        res = TrainResult(work, work / "bundle", manifest["metrics"], float("nan"))
    else:
        res = train(data, work, cfg, quiet=True)
    train_s = time.perf_counter() - t0
    p = Predictor.load(res.bundle_path, num_threads=threads, backend=backend)
    y = np.array([p.classes.index(c) for _, c in test])
    m = _id_metrics(p, _chunked_scores(p, [f for f, _ in test]), y)
    used = json.loads((work / "config.json").read_text())
    return {"task": task, "arm": arm, "seed": seed, "train_seconds": round(train_s, 1),
            "accuracy": m["accuracy"], "ece_default": m["ece_default"],
            "ece_uncalibrated": m["ece_uncalibrated"], "temperature": m["temperature"],
            "n_test": m["n_test"], "rule": m["rule"], "val_accuracy":
            res.metrics.get("val_accuracy"),
            "chosen": {k: used[k] for k in ("model", "model_kwargs", "img_size", "scaling",
                                            "augment", "epochs", "lr", "label_smoothing",
                                            "ema_decay", "pretrained")},
            "why": json.loads((work / "run.json").read_text())["model_choice"],
            "route_check": json.loads((work / "run.json").read_text()).get("route_check")}


def merge(paths: list[Path]) -> None:
    rows = [r for p in paths for r in json.loads(p.read_text())]
    print("| task | arm | seed | model, side, scaling, augment, epochs | test acc. | ECE default "
          "(T) | ECE T = 1 | default rule: answered / acc. | train s |")
    print("|---|---|---:|---|---:|---:|---:|---|---:|")
    for r in rows:
        c = r["chosen"]
        w = c["model_kwargs"].get("widths") if c["model_kwargs"] else None
        print(f"| {r['task']} | {r['arm']} | {r['seed']} | {c['model']}"
              f"{f' {w}' if w else ''}, {c['img_size'] or 'its default'} px, {c['scaling']}, "
              f"{c['augment']}, {c['epochs']} | {r['accuracy']:.2%} | {r['ece_default']:.2%} "
              f"({r['temperature']:.3g}) | {r['ece_uncalibrated']:.2%} | "
              f"{r['rule']['coverage']:.1%} / {r['rule']['accuracy_answered']:.2%} | "
              f"{r['train_seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="digits,fashion,mstar")
    ap.add_argument("--arms", default="before,default")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-defaults"))
    ap.add_argument("--merge", type=Path, nargs="*", help="print the table of rows.json files")
    ap.add_argument("--rescore", action="store_true",
                    help="score a run's existing bundle instead of training it again (its "
                         "training time is then unknown)")
    ap.add_argument("--backend", default="auto",
                    help="torch for a bundle whose ONNX graph has no features output (the "
                         "head-only pretrained bundles: no OOD rule)")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    for task in args.tasks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for arm in args.arms.split(","):
                if any((r["task"], r["arm"], r["seed"]) == (task, arm, seed) for r in rows):
                    continue  # done in an earlier call
                row = run(task, arm, seed, args.out, args.threads, args.rescore,
                          args.backend)
                rows.append(row)
                rows_path.write_text(json.dumps(rows, indent=1))
                print(json.dumps({k: row[k] for k in ("task", "arm", "seed", "accuracy",
                                                      "ece_default", "train_seconds")}),
                      flush=True)
    merge([rows_path])


if __name__ == "__main__":
    main()
