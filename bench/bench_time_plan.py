"""``--time-budget``: the seconds ``imgtriage train`` (``--model auto``) plans against those it
takes, on data of several sizes, with where the time went.

Each task trains with default options (only ``--time-budget`` where a task names one, to
keep the bench short) and reads ``run.json`` -> ``time`` (the plan: fixed part by what it is
made of, passes, epochs x seconds; the run: epochs and the rest). The steps of the run are
also timed from outside (the ``train.run`` functions each phase calls, wrapped here), so the
fixed part's estimate can be compared phase by phase with what it cost.

Tasks: ``digits300`` (300 scikit-learn digits), ``digits`` (all 1,797), ``fashion6k``
(6,000 Fashion-MNIST training images, Debian ``dataset-fashion-mnist``), ``cifar`` (the
shared ``cifar10-small`` 5,000 photos: the pretrained route). ``TASK@MINUTES`` gives that
task a ``--time-budget``.

Usage (timed: take the bench lock, normal priority; one task after another):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_time_plan.py \\
        --tasks digits300,digits,fashion6k@2 --out /tmp/time-plan
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
FASHION = Path("/usr/share/datasets/fashion-mnist")
PHASES = ("probe_images", "plan_recipe_timed", "plan_routes", "_sources", "embed_splits",
          "fit", "train_head", "choose_views", "calibrate_run", "attach_graph",
          "attach_ood_score", "save_bundle")


def _write_pngs(images: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    from PIL import Image

    for i, (a, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"c{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return root


def task_data(task: str, out: Path) -> Path:
    root = out / "data" / task
    if task == "cifar":
        return SHARED / "cifar10-small" / "train"
    if root.is_dir():
        return root
    if task.startswith("digits"):
        from sklearn.datasets import load_digits

        d = load_digits()
        n = 300 if task == "digits300" else len(d.target)
        idx = np.random.default_rng(0).permutation(len(d.target))[:n]
        return _write_pngs((d.images[idx] / 16 * 255).astype(np.uint8), d.target[idx], root)
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    idx = np.random.default_rng(0).permutation(len(y))[:6000]
    return _write_pngs(x[idx], y[idx], root)


def _timed(run_mod: Any, spent: dict[str, float]) -> None:
    """Wrap each phase function the run module calls, adding its seconds to ``spent``."""
    for name in PHASES:
        real = getattr(run_mod, name, None)
        if real is None:
            continue

        @functools.wraps(real)
        def wrapper(*a, _real=real, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0

        setattr(run_mod, name, wrapper)


def run(task: str, out: Path, budget: float | None, threads: int,
        spent: dict[str, float]) -> dict[str, Any]:
    """One task; ``spent`` is the dict :func:`_timed` fills (cleared here)."""
    from imgtriage.train import run as run_mod
    from imgtriage.train.config import TrainConfig

    data = task_data(task, out)
    spent.clear()
    kw = {"time_budget": budget} if budget else {}
    t0 = time.perf_counter()
    res = run_mod.train(data, out / task, TrainConfig(num_threads=threads, **kw), quiet=True)
    wall = time.perf_counter() - t0
    said = json.loads((out / task / "run.json").read_text())
    import re

    found = re.search(r"~(\d+)s in all", said.get("model_choice", ""))  # a tree before "time"
    row = {"task": task, "budget_min": budget or 15.0, "wall_s": round(wall, 1),
           "time": said.get("time"),
           "planned_in_line_s": float(found.group(1)) if found else None,
           "epochs": json.loads((out / task / "config.json").read_text())["epochs"],
           "phases_s": {k: round(v, 1) for k, v in spent.items()},
           "val_accuracy": res.metrics.get("val_accuracy")}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="digits300,digits,fashion6k")
    ap.add_argument("--budget", type=float, default=None, help="--time-budget (minutes) for "
                    "every task (default: the default, 15)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-time-plan"))
    args = ap.parse_args()
    from imgtriage.train import run as run_mod

    spent: dict[str, float] = {}
    _timed(run_mod, spent)
    rows = []
    for item in args.tasks.split(","):  # TASK or TASK@MINUTES (that task's --time-budget)
        task, _, minutes = item.partition("@")
        rows.append(run(task, args.out, float(minutes) if minutes else args.budget,
                        args.threads, spent))
    print("| task (budget) | planned total | planned fixed | epochs planned x s | took |"
          " epochs took | the rest took | planned / took |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        t = r["time"]
        if t is None:  # a tree without run.json -> time: the plan's line and the wall time
            p = r["planned_in_line_s"]
            print(f"| {r['task']} ({r['budget_min']:g} min) | {p or float('nan'):.0f} s | | "
                  f"{r['epochs']} epochs | {r['wall_s']:.0f} s (wall) | | | "
                  f"{(p or float('nan')) / r['wall_s']:.2f} |")
            continue
        p = t["planned"]
        print(f"| {r['task']} ({r['budget_min']:g} min) | {p['total_s']:.0f} s | "
              f"{p['fixed']['total']:.0f} s | {p['epochs']} x {p['epoch_s']:.1f} s | "
              f"{t['actual_s']:.0f} s | "
              f"{t['actual_epochs_s']:.0f} s | {t['actual_rest_s']:.0f} s | "
              f"{p['total_s'] / t['actual_s']:.2f} |")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
