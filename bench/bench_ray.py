"""Files/s of the Ray engine against the local engine, on the same folder, in the same run.

The folder is N grayscale PNGs made from scikit-learn's digits (jittered so no two files are
equal) at ``--img-size`` pixels; the bundle is a ``--model`` trained for one epoch on a few
hundred of them by ``imgtriage.train`` with its defaults, so it carries the ONNX graph(s)
``train`` attaches (or ``--bundle`` to bring one). Rows, for each backend of ``--backends``
(``auto``: the default path, ONNX Runtime for a bundle from ``train``; ``torch``:
``--backend torch``):

- local: ``Predictor.predict_paths`` (decoding threads + the model on both cores);
- ray, warm: ``ray_predict`` on an already started local cluster (``ray.init(num_cpus=2)``);
  each run still starts its actor pool (one process loading the bundle);
- ray on N/2 files, for the marginal rate (N - N/2) / (t(N) - t(N/2)) of the same round:
  the steady-state rate once fixed costs (scheduling, actor start, collection) are paid,
  the number that scales on a cluster;
- the cluster's own start-up (``ray.init``), once, before the rounds.

Every row runs once per round, in a rotating order, for ``--rounds`` (>= 3) rounds; each
round's rates are divided by the same round's local rate of the first backend, and the
table is the median (min-max) of those ratios (never best-of). Every Ray report is checked
against the local one of its backend (same class for every file).

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ray.py
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ray.py --img-size 96 \\
        --model deep_cnn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` jittered digit PNGs in 10 class folders (kept if already there)."""
    from sklearn.datasets import load_digits

    marker = root / f".done-{n}-{size}"
    if marker.exists():
        return root
    d = load_digits()
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = i % len(d.images)
        img = d.images[k] / 16 * 255 + rng.normal(0, 8, d.images[k].shape)
        out = root / f"d{d.target[k]}"
        out.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        im.resize((size, size), Image.BILINEAR).save(out / f"{i:06d}.png")
    marker.touch()
    return root


def make_bundle(workdir: Path, size: int, model: str) -> Path:
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    run = workdir / f"run-{model}-{size}"
    if (run / "bundle" / "manifest.json").is_file():
        return run / "bundle"
    data = make_folder(workdir / f"train-{size}", 600, size, seed=1)
    cfg = TrainConfig(model=model, img_size=size, epochs=1, batch_size=32, lr=3e-3,
                      num_threads=2, seed=0)
    return train(data, run, cfg, quiet=True).bundle_path


def timed(fn: Callable[[], dict]) -> tuple[float, dict]:
    """(seconds, report) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_min_max(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--model", default="crop_cnn")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backends", default="auto,torch",
                    help="comma-separated; the first one's local row is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgtriage-bench-ray"))
    args = ap.parse_args()
    if args.rounds < 3:
        sys.exit("--rounds must be >= 3: the figures are medians of within-round ratios")

    import ray

    from imgtriage.integrations.ray_engine import RayConfig, ray_predict
    from imgtriage.predict import Predictor
    from imgtriage.predict.batch import iter_files

    folder = make_folder(args.workdir / f"inbox-{args.img_size}", args.files, args.img_size)
    bundle = args.bundle or make_bundle(args.workdir, args.img_size, args.model)
    # *.png only: the folder also holds make_folder's empty marker file
    files = [f for f in iter_files([folder]) if f.endswith(".png")][: args.files]
    half = files[: len(files) // 2]
    n, bs = len(files), args.batch_size
    backends = args.backends.split(",")
    load0 = os.getloadavg()[0]

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    t_init = time.perf_counter() - t0
    rows: dict[str, Callable[[], dict]] = {}
    for be in backends:
        p = Predictor.load(bundle, backend=be)
        cfg = RayConfig(batch_size=bs, backend=be)
        rows[f"local {be}"] = lambda p=p: p.predict_paths(files, batch_size=bs)
        rows[f"ray {be}"] = lambda cfg=cfg: ray_predict(bundle, files, config=cfg)
        rows[f"ray {be} half"] = lambda cfg=cfg: ray_predict(bundle, half, config=cfg)
    secs: dict[str, list[float]] = {k: [] for k in rows}
    same = {name: True for name in rows if name.startswith("ray") and "half" not in name}
    names = list(rows)
    try:
        for r in range(args.rounds):
            local: dict[str, list[str]] = {}
            remote: dict[str, list[str]] = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                dt, rep = timed(rows[name])
                secs[name].append(dt)
                classes = [x["class"] for x in rep["results"]]
                if name.startswith("local"):
                    local[name.split()[1]] = classes
                elif name in same:
                    remote[name] = classes
                print(f"  round {r + 1} {name:<18} {dt:6.2f}s ({len(rep['results'])} files)",
                      flush=True)
            for name, classes in remote.items():
                same[name] = same[name] and classes == local[name.split()[1]]
        actors = rep["meta"]["ray"]["num_actors"] if "ray" in rep["meta"] else "?"
    finally:
        ray.shutdown()

    base = [n / t for t in secs[f"local {backends[0]}"]]
    table: dict[str, list[float]] = {}
    for be in backends:
        loc, full, hlf = secs[f"local {be}"], secs[f"ray {be}"], secs[f"ray {be} half"]
        table[f"local {be}"] = [n / t for t in loc]
        table[f"ray {be} (warm cluster)"] = [n / t for t in full]
        table[f"ray {be} (incl. ray.init)"] = [n / (t + t_init) for t in full]
        table[f"ray {be} marginal"] = [(n - len(half)) / max(f - h, 1e-9)
                                       for f, h in zip(full, hlf, strict=True)]
    print(f"\n{n} files of {args.img_size}x{args.img_size} px, {args.model}, batch {bs}, "
          f"{os.cpu_count()} CPUs; Ray: {actors} actor(s) + decode tasks; "
          f"{args.rounds} rounds; reports agree: {same}; load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    base_name = f"local {backends[0]}"
    print(f"{'row':<28}{'files/s median (min-max)':>28}{'vs ' + base_name:>24}")
    for name, rates in table.items():
        ratio = [x / b for x, b in zip(rates, base, strict=True)]
        print(f"{name:<28}{median_min_max(rates):>28}{median_min_max(ratio):>24}")
    for be in backends[1:]:
        ratio = [a / b for a, b in zip(secs[f"ray {be}"], secs[f"local {be}"], strict=True)]
        print(f"ray {be} / local {be} (warm): "
              f"{median_min_max([1 / x for x in ratio])}")
    fixed = {be: [f - (len(half)) / m for f, m in zip(
        secs[f"ray {be} half"], table[f"ray {be} marginal"], strict=True)] for be in backends}
    print(f"ray.init: {t_init:.1f}s; fixed cost per Ray run (t(N/2) - (N/2) / marginal): "
          + ", ".join(f"{be} {median_min_max(v)}s" for be, v in fixed.items()))
    print(json.dumps({"files": n, "img_size": args.img_size, "model": args.model,
                      "rounds": args.rounds, "ray_init_s": round(t_init, 2),
                      "seconds": secs, "same_classes": same}))


if __name__ == "__main__":
    main()
