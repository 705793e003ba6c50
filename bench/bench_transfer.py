"""Transfer learning from the installed ImageNet weights against a same-run baseline (issue 14).

Arms, run in interleaved rounds (round 1: every arm, round 2: every arm, ...):

- ``frozen``: ``imgtriage train --model efficientnet_lite0 --freeze-backbone`` (each image
  through the frozen pretrained backbone once, the head on the embeddings; a fresh embedding
  cache every round, so the time is a cold run), then ``imgtriage evaluate`` on the test split;
- ``auto``: ``imgtriage train --model auto`` with default options (its ``--time-budget`` of
  15 minutes), then ``imgtriage evaluate``;
- ``svm``: scikit-learn PCA (100 components, whitened) + RBF SVM on raw pixels (CIFAR 32x32 RGB;
  tiles 64x64 grey; class_weight balanced), fitted on train+val, scored on the same test split.

The imgtriage arms also report whether training folded the mirror into the bundle (run.json
``view_average``: decided on validation; then every prediction averages the image and its
mirror, inside the timed wall) and, outside the timed wall, the test accuracy with the views
``imgtriage evaluate --tta`` adds (none beyond the folded mirror for such a bundle).

Wall times are from the folder to the report (subprocess commands for the imgtriage arms:
imports, discovery, decoding, embedding, training, bundle, evaluation). Reports medians
(min-max) over the rounds.

Tasks: ``cifar`` (``../shared/datasets/cifar10-small``: train/ 5,000, test/ 1,000; the
validation split is carved from train) and ``tiles`` (magnetic-tile: Free = safe, every
defect kind = unsafe; a seeded stratified 60/20/20 train/val/test manifest shared by all arms;
the imgtriage arms also report the safe-unsafe recipe's recall-first rule: the p(unsafe)
threshold for 95% unsafe recall on validation, as a point target and with the
confidence bound (``--delta`` 0.05), and the test split's unsafe recall and false-alarm rate
under each, outside the timed wall)::

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_transfer.py cifar --rounds 3
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_transfer.py tiles --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
EXE = [sys.executable, "-m", "imgtriage"]
ARMS = {"frozen": ["--model", "efficientnet_lite0", "--freeze-backbone"],
        "auto": ["--model", "auto"]}


def tile_manifest(out: Path, seed: int = 0) -> Path:
    """path,label,split rows: Free -> safe, defect folders -> unsafe; stratified 60/20/20."""
    rng = np.random.default_rng(seed)
    rows = []
    root = DATA / "magnetic-tile"
    for label, folders in (("safe", ["Free"]), ("unsafe", sorted(
            p.name for p in root.iterdir() if p.is_dir() and p.name != "Free"))):
        files = sorted(f for d in folders for f in (root / d).glob("*.jpg"))
        order = rng.permutation(len(files))
        n_test, n_val = round(0.2 * len(files)), round(0.2 * len(files))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            rows.append((str(files[i]), label, split))
    path = out / "tiles.csv"
    out.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    return path


def task_data(task: str, out: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """What ``imgtriage train`` gets, and every (path, label, split) row."""
    if task == "cifar":
        root = DATA / "cifar10-small"
        rows = [(str(f), f.parent.name, split) for split in ("train", "test")
                for f in sorted((root / split).rglob("*.jpg"))]
        return root, rows
    path = tile_manifest(out)
    with path.open() as fh:
        return path, [(r["path"], r["label"], r["split"]) for r in csv.DictReader(fh)]


def run_imgtriage(arm: str, data: Path, task: str, out: Path, threads: int) -> dict:
    run = out / arm
    shutil.rmtree(run, ignore_errors=True)
    cache = out / f"cache-{arm}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "IMGTRIAGE_CACHE": str(cache)}
    t0 = time.perf_counter()
    subprocess.run([*EXE, "train", str(data), "--out", str(run), *ARMS[arm], "--threads",
                    str(threads), "--embed-cache", str(cache), "--checkpoint-every", "0"],
                   check=True, env=env)
    t_train = time.perf_counter() - t0
    test = (["--split", "test"] if task == "tiles" else [])
    target = run / "splits.csv" if task == "tiles" else data / "test"
    subprocess.run([*EXE, "evaluate", str(run / "bundle"), str(target), *test, "--out",
                    str(run / "eval")], check=True, env=env)
    wall = time.perf_counter() - t0
    rep = json.loads((run / "eval" / "report.json").read_text())["metrics"]
    cfg = json.loads((run / "config.json").read_text())
    res = {"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"],
           "train_s": t_train, "wall_s": wall, "model": cfg["model"],
           "epochs": cfg["epochs"], "freeze_backbone": cfg["freeze_backbone"],
           "img_size": cfg["img_size"],
           "choice": json.loads((run / "run.json").read_text())["model_choice"],
           "view_average": json.loads((run / "run.json").read_text()).get("view_average")}
    # not timed: the same bundle with the flip views its manifest carries (`evaluate --tta`)
    subprocess.run([*EXE, "evaluate", str(run / "bundle"), str(target), *test, "--tta",
                    "--out", str(run / "eval-tta")], check=True, env=env)
    tta = json.loads((run / "eval-tta" / "report.json").read_text())["metrics"]
    res.update(accuracy_tta=tta["accuracy"], balanced_accuracy_tta=tta["balanced_accuracy"])
    if task == "tiles":
        res["roc_auc_unsafe"] = next(p["roc_auc"] for p in rep["per_class"]
                                     if p["class"] == "unsafe")
        res.update(recall_rule(run, env))
    return res


def recall_rule(run: Path, env: dict, delta: float = 0.05) -> dict:
    """The safe-unsafe recipe's recall-first rule on the trained bundle (not timed): the
    threshold on p(unsafe) for 95% unsafe recall on the validation split (``imgtriage
    calibrate --threshold-strategy target_recall``), then the test split's unsafe recall and
    false-alarm rate (safe tiles answered unsafe) under it. Twice: the point rule (95% on
    validation) and the confidence-bounded one (``--delta``: 95% on new data with
    probability >= 1 - delta, the order-statistic bound of issue 15); ``rule_*`` / ``bound_*``."""
    bundle, splits = run / "bundle", run / "splits.csv"
    out = {}
    for key, extra in (("rule", []), ("bound", ["--delta", str(delta)])):
        subprocess.run([*EXE, "calibrate", str(bundle), str(splits), "--split", "val",
                        "--profile", "recall", "--make-default", "--threshold-strategy",
                        "target_recall", "--target", "0.95", "--positive-class", "unsafe",
                        *extra], check=True, env=env)
        subprocess.run([*EXE, "evaluate", str(bundle), str(splits), "--split", "test", "--out",
                        str(run / f"eval-{key}")], check=True, env=env)
        d = json.loads((run / f"eval-{key}" / "report.json").read_text())["decision"]
        per = {p["class"]: p for p in d["per_class"]}
        out.update({f"{key}_unsafe_recall": per["unsafe"]["recall"],
                    f"{key}_false_alarm_rate": 1.0 - per["safe"]["recall"]})
    return out


def _pixels(paths: list[str], task: str) -> np.ndarray:
    from PIL import Image

    out = []
    for p in paths:
        img = Image.open(p)
        img = img.convert("RGB").resize((32, 32)) if task == "cifar" else \
            img.convert("L").resize((64, 64))
        out.append(np.asarray(img, np.float32).ravel() / 255.0)
    return np.stack(out)


def run_svm(rows: list[tuple[str, str, str]], task: str) -> dict:
    from sklearn.decomposition import PCA
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    t0 = time.perf_counter()
    fit = [r for r in rows if r[2] != "test"]
    test = [r for r in rows if r[2] == "test"]
    x_fit, x_test = _pixels([r[0] for r in fit], task), _pixels([r[0] for r in test], task)
    y_fit, y_test = np.array([r[1] for r in fit]), np.array([r[1] for r in test])
    model = make_pipeline(StandardScaler(), PCA(100, whiten=True, random_state=0),
                          SVC(C=10, gamma="scale", class_weight="balanced",
                              probability=task == "tiles", random_state=0))
    model.fit(x_fit, y_fit)
    pred = model.predict(x_test)
    res = {"accuracy": float((pred == y_test).mean()),
           "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
           "wall_s": time.perf_counter() - t0}
    if task == "tiles":
        p = model.predict_proba(x_test)[:, list(model.classes_).index("unsafe")]
        res["roc_auc_unsafe"] = float(roc_auc_score(y_test == "unsafe", p))
    return res


def _summary(results: dict[str, list[dict]]) -> dict:
    out = {}
    for arm, rs in results.items():
        keys = [k for k, v in rs[0].items() if isinstance(v, (int, float))
                and not isinstance(v, bool)]
        out[arm] = {k: {"median": float(np.median([r[k] for r in rs])),
                        "min": float(min(r[k] for r in rs)),
                        "max": float(max(r[k] for r in rs))} for k in keys}
    if "svm" in results:
        for arm in results:
            if arm != "svm":
                gain = [a["balanced_accuracy"] - s["balanced_accuracy"]
                        for a, s in zip(results[arm], results["svm"], strict=False)]
                out[arm]["balanced_accuracy_minus_svm"] = float(np.median(gain))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["cifar", "tiles"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default="svm,frozen,auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-bench-transfer"))
    args = ap.parse_args(argv)
    out = args.out / args.task
    data, rows = task_data(args.task, out)
    arms = args.arms.split(",")
    results: dict[str, list[dict]] = {a: [] for a in arms}
    load = os.getloadavg()[0]
    for r in range(args.rounds):
        for arm in arms:
            res = run_svm(rows, args.task) if arm == "svm" else run_imgtriage(
                arm, data, args.task, out, args.threads)
            results[arm].append(res)
            print(json.dumps({"round": r + 1, "arm": arm, **res}), flush=True)
    summary = {"task": args.task, "rounds": args.rounds, "threads": args.threads,
               "load_avg_1min_at_start": load, "load_avg_1min_at_end": os.getloadavg()[0],
               "summary": _summary(results), "runs": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["summary"], indent=2))
    return summary


if __name__ == "__main__":
    main()
