"""Files/s of the Ray engine against the local engine, on the same folder, in the same run.

The folder is N grayscale PNGs made from scikit-learn's digits (jittered so no two files are
equal) at ``--img-size`` pixels; the bundle is a ``--model`` trained for one epoch on a few
hundred of them (or ``--bundle`` to bring one). Measured, best of ``--repeats``:

- local: ``Predictor.predict_paths`` (decoding threads + torch on both cores);
- ray, warm: ``ray_predict`` on an already started local cluster (``ray.init(num_cpus=2)``);
  each run still starts its actor pool (one process loading torch and the bundle);
- ray, marginal: (N - N/2) / (t(N) - t(N/2)): the steady-state rate once fixed costs
  (scheduling, actor start, collection) are paid, the number that scales on a cluster;
- the cluster's own start-up (``ray.init``), once.

Every Ray report is checked against the local one (same classes for every file).

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ray.py
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ray.py --img-size 96 \\
        --model deep_cnn
"""

from __future__ import annotations

import argparse
import json
import os
import time
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


def best_of(fn, repeats: int) -> tuple[float, dict]:
    best, out = float("inf"), {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--model", default="crop_cnn")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/imgtriage-bench-ray"))
    args = ap.parse_args()

    import ray

    from imgtriage.integrations.ray_engine import RayConfig, ray_predict
    from imgtriage.predict import Predictor
    from imgtriage.predict.batch import iter_files

    folder = make_folder(args.workdir / f"inbox-{args.img_size}", args.files, args.img_size)
    bundle = args.bundle or make_bundle(args.workdir, args.img_size, args.model)
    files = list(iter_files([folder]))[: args.files]
    half = files[: len(files) // 2]
    bs = args.batch_size

    predictor = Predictor.load(bundle)
    t_local, local = best_of(lambda: predictor.predict_paths(files, batch_size=bs), args.repeats)

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    t_init = time.perf_counter() - t0
    cfg = RayConfig(batch_size=bs)
    try:
        t_ray, rep = best_of(lambda: ray_predict(bundle, files, config=cfg), args.repeats)
        t_half, _ = best_of(lambda: ray_predict(bundle, half, config=cfg), args.repeats)
    finally:
        ray.shutdown()
    same = [r["class"] for r in rep["results"]] == [r["class"] for r in local["results"]]

    n = len(files)
    marginal = (n - len(half)) / max(t_ray - t_half, 1e-9)
    rows = {
        "local": n / t_local,
        "ray (warm cluster)": n / t_ray,
        "ray (incl. ray.init)": n / (t_ray + t_init),
        "ray marginal": marginal,
    }
    print(f"\n{n} files of {args.img_size}x{args.img_size} px, {args.model}, batch {bs}, "
          f"{os.cpu_count()} CPUs; Ray: {rep['meta']['ray']['num_actors']} actor(s) + "
          f"decode tasks; reports agree: {same}")
    print(f"{'engine':<22}{'files/s':>10}{'vs local':>10}")
    for name, rate in rows.items():
        print(f"{name:<22}{rate:>10.0f}{rate / rows['local']:>9.2f}x")
    print(f"ray.init: {t_init:.1f}s; Ray run on {n} files {t_ray:.1f}s, on {len(half)} "
          f"{t_half:.1f}s (fixed cost ~{t_half - len(half) / marginal:.1f}s per run)")
    print(json.dumps({"files": n, "img_size": args.img_size, "model": args.model,
                      "local_fps": round(rows["local"], 1),
                      "ray_fps": round(rows["ray (warm cluster)"], 1),
                      "ray_marginal_fps": round(marginal, 1), "ray_init_s": round(t_init, 2),
                      "ratio": round(rows["ray (warm cluster)"] / rows["local"], 3),
                      "same_classes": same}))


if __name__ == "__main__":
    main()
