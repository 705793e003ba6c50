"""N-way K-shot accuracy of the gallery classifier on classes held out from training, and its
inference time per batch of 32 crops against the plain crop CNN, in the same run.

Data: MSTAR SOC-10 (``../shared/datasets/mstar-soc10``: 128x128 SAR chips, train at 17 deg,
test at 15 deg depression). The encoder is trained episodically (``train_fewshot``) on the
train chips of 6 classes; the other 4 classes are never seen in training. For each K in
``--shots`` and each of ``--episodes`` episodes, K train chips per held-out class are drawn
at random and enrolled, and every test chip of those 4 classes is classified (4-way, all
~940 test chips per episode). Mean and std over episodes.

Reference figures in the same run:

* closed-set: the gallery of every train chip of the 6 seen classes, and a crop_cnn trained
  on the same 6 classes (``imgtriage.train``), both on the 6 classes' test chips;
* timing: ``rows_for_inputs`` on a preprocessed batch of 32 crops (model + scoring + result
  rows; decoding excluded), and the bare forward pass, for the crop CNN and for the gallery
  (prototype and kNN over every enrolled chip), for each backend of ``--backends`` (``auto``:
  the default path, ONNX Runtime for bundles from training; ``torch``: ``--backend torch``).
  Every row runs once per round (mean of ``--iters`` calls), in a rotating order, for
  ``--rounds`` (>= 3) rounds; each round's times are divided by the same round's crop CNN
  of the first backend (and of its own backend); medians (min-max) of those ratios, never
  best-of. ``--timing-only`` skips the accuracy parts (the bundles are reused from ``--out``
  when there, so an untimed first run can train them).

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_fewshot.py --out /tmp/fsbench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def _files(root: Path, classes: list[str]) -> tuple[list[str], list[str]]:
    paths, labels = [], []
    for c in classes:
        for f in sorted((root / c).iterdir()):
            paths.append(str(f))
            labels.append(c)
    return paths, labels


def _decode(paths: list[str], spec) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from imgtriage.data import load_input

    with ThreadPoolExecutor(2) as pool:
        return np.stack(list(pool.map(lambda p: load_input(p, spec)[0], paths)))


def _train_encoder(args, data: Path, seen: list[str], out: Path) -> Path:
    from imgtriage.data import write_manifest
    from imgtriage.train.fewshot import FewShotConfig, train_fewshot

    if (out / "bundle" / "manifest.json").is_file():
        print(f"reusing encoder {out / 'bundle'}")
        return out / "bundle"
    paths, labels = _files(data / "train", seen)
    cfg = FewShotConfig(loss=args.loss, epochs=args.epochs, episodes=args.train_episodes,
                        n_way=5, k_shot=5, n_query=5, img_size=64, augment="flip", lr=2e-3,
                        seed=0, num_threads=args.threads)
    res = train_fewshot(write_manifest(out / "seen.csv", paths, labels), out, cfg, quiet=True)
    print(f"encoder ({args.loss}, {args.epochs} epochs x {args.train_episodes} episodes) in "
          f"{res.seconds:.0f}s: {res.metrics}")
    return res.bundle_path


def _train_cnn(args, data: Path, seen: list[str], out: Path) -> Path:
    from imgtriage.data import write_manifest
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    if (out / "bundle" / "manifest.json").is_file():
        print(f"reusing crop CNN {out / 'bundle'}")
        return out / "bundle"
    paths, labels = _files(data / "train", seen)
    cfg = TrainConfig(model="crop_cnn", img_size=64, epochs=args.cnn_epochs, batch_size=64,
                      lr=3e-3, augment="flip", seed=0, num_threads=args.threads)
    t0 = time.perf_counter()
    res = train(write_manifest(out / "seen.csv", paths, labels), out, cfg, quiet=True)
    print(f"crop CNN ({args.cnn_epochs} epochs) in {time.perf_counter() - t0:.0f}s: "
          f"{res.metrics}")
    return res.bundle_path


def kshot_episodes(encoder, spec, data: Path, held: list[str], shots: list[int],
                   episodes: int, seed: int) -> dict[str, dict]:
    """Mean/std accuracy over episodes of a gallery of K random train chips per class."""
    from imgtriage.models.gallery import Gallery, embed

    pool_p, pool_y = _files(data / "train", held)
    test_p, test_y = _files(data / "test", held)
    pool = embed(encoder, _decode(pool_p, spec))
    queries = embed(encoder, _decode(test_p, spec))
    pool_y, test_y = np.array(pool_y), np.array(test_y)
    rng = np.random.default_rng(seed)
    out = {}
    for k in shots:
        accs = {"prototype": [], "knn1": []}
        for _ in range(episodes):
            idx = np.concatenate([rng.choice(np.flatnonzero(pool_y == c), k, replace=False)
                                  for c in held])
            g = Gallery.build(pool[idx], pool_y[idx], [str(i) for i in idx], held)
            for name, method in (("prototype", "prototype"), ("knn1", "knn")):
                pred = np.array(g.classes)[g.similarities(queries, method, 1).argmax(1)]
                accs[name].append(float(np.mean(pred == test_y)))
        out[f"{k}-shot"] = {m: {"mean": float(np.mean(a)), "std": float(np.std(a))}
                            for m, a in accs.items()}
        print(f"{len(held)}-way {k:2d}-shot over {episodes} episodes: " + ", ".join(
            f"{m} {v['mean']:.3f} +- {v['std']:.3f}" for m, v in out[f"{k}-shot"].items()))
    out["queries"] = len(test_y)
    return out


def _accuracy(predictor, x: np.ndarray, y: list[str]) -> float:
    from imgtriage.predict import PredictOptions

    rows = []
    for i in range(0, len(x), 256):
        rows += predictor.rows_for_inputs(x[i:i + 256], [str(j) for j in range(i, i + len(
            x[i:i + 256]))], PredictOptions(abstain=False))
    ids = [r["class_id"] for r in rows]
    return float(np.mean([predictor.classes[c] == t for c, t in zip(ids, y, strict=True)]))


def _timings(predictors: dict, rounds: int, iters: int = 20) -> dict[str, dict[str, list]]:
    """Mean milliseconds per batch of 32 (``rows_for_inputs`` and the bare backend call), one
    run of ``iters`` calls per row per round, rows in a rotating order; ``predictors`` maps a
    name to (predictor, its preprocessed batch of 32). -> name -> {rows_ms, forward_ms}:
    one figure per round."""
    from imgtriage.predict import PredictOptions

    opts = PredictOptions()
    names = [str(i) for i in range(32)]
    got: dict[str, dict[str, list]] = {n: {"rows_ms": [], "forward_ms": []} for n in predictors}
    for p, x32 in predictors.values():  # warm-up
        p.rows_for_inputs(x32, names, opts)
        p.backend(x32)
    order = list(predictors)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            p, x32 = predictors[name]
            t0 = time.perf_counter()
            for _ in range(iters):
                p.rows_for_inputs(x32, names, opts)
            got[name]["rows_ms"].append((time.perf_counter() - t0) / iters * 1e3)
            t0 = time.perf_counter()
            for _ in range(iters):
                p.backend(x32)
            got[name]["forward_ms"].append((time.perf_counter() - t0) / iters * 1e3)
    return got


def _mmm(values: list[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")


def _print_timings(got: dict[str, dict[str, list]], base: str) -> None:
    print(f"ms per batch of 32, median (min-max) over rounds; ratios within rounds, against "
          f"{base} and against crop_cnn of the same backend")
    for name, t in got.items():
        own = got[f"crop_cnn {name.rsplit(' ', 1)[-1]}"]["rows_ms"]
        vs_base = [a / b for a, b in zip(t["rows_ms"], got[base]["rows_ms"], strict=True)]
        vs_own = [a / b for a, b in zip(t["rows_ms"], own, strict=True)]
        print(f"{name:24s} rows {_mmm(t['rows_ms'])} ms  x{_mmm(vs_base)} vs {base}  "
              f"x{_mmm(vs_own)} vs own crop_cnn   forward {_mmm(t['forward_ms'])} ms",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "mstar-soc10")
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-bench-fewshot"))
    ap.add_argument("--held-out", default="", help="comma-separated classes never trained on "
                                                   "(default: 4 drawn with seed 0)")
    ap.add_argument("--shots", default="1,5,10,20")
    ap.add_argument("--episodes", type=int, default=50, help="evaluation episodes per K")
    ap.add_argument("--loss", default="proto")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train-episodes", type=int, default=80)
    ap.add_argument("--cnn-epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (>= 3)")
    ap.add_argument("--iters", type=int, default=20, help="calls per row per timing round")
    ap.add_argument("--backends", default="auto,torch",
                    help="comma-separated; the first one's crop_cnn is the timing baseline")
    ap.add_argument("--timing-only", action="store_true",
                    help="skip the K-shot and closed-set accuracy")
    args = ap.parse_args()
    if args.rounds < 3:
        sys.exit("--rounds must be >= 3: the figures are medians of within-round ratios")
    backends = args.backends.split(",")

    import torch

    from imgtriage.predict import Predictor
    from imgtriage.predict.gallery_edit import set_rule

    torch.set_num_threads(args.threads)
    classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    held = (args.held_out.split(",") if args.held_out else
            sorted(np.random.default_rng(0).permutation(classes)[:4].tolist()))
    seen = [c for c in classes if c not in held]
    print(f"seen (trained on): {seen}\nheld out (enrolled from K shots): {held}")
    enc_bundle = _train_encoder(args, args.data, seen, args.out / "encoder")
    cnn_bundle = _train_cnn(args, args.data, seen, args.out / "cnn")
    gallery = Predictor.load(enc_bundle)
    results = {"seen": seen, "held_out": held, "args": {k: str(v) for k, v in
                                                         vars(args).items()}}
    if not args.timing_only:  # the episodes embed with the torch encoder (same weights)
        torch_gallery = Predictor.load(enc_bundle, backend="torch")
        results["kshot"] = kshot_episodes(torch_gallery.backend.encoder, gallery.spec,
                                          args.data, held,
                                          [int(s) for s in args.shots.split(",")],
                                          args.episodes, seed=1)
    cnn = Predictor.load(cnn_bundle)
    test_p, test_y = _files(args.data / "test", seen)
    x = _decode(test_p, gallery.spec)
    x_cnn = x if cnn.spec == gallery.spec else _decode(test_p, cnn.spec)
    knn_bundle = args.out / "knn_gallery"
    if not (knn_bundle / "manifest.json").is_file():
        knn_bundle = set_rule(enc_bundle, method="knn", k=1, out=knn_bundle)
    knn = Predictor.load(knn_bundle)
    if not args.timing_only:
        results["closed_set_6way"] = {"gallery_prototype": _accuracy(gallery, x, test_y),
                                      "gallery_knn1": _accuracy(knn, x, test_y),
                                      "crop_cnn": _accuracy(cnn, x_cnn, test_y),
                                      "test_chips": len(x)}
        print(f"closed set, {len(seen)} seen classes, {len(x)} test chips: "
              f"{results['closed_set_6way']}")
    results["gallery_items"] = len(gallery.gallery)
    rows = {}
    for be in backends:
        rows[f"crop_cnn {be}"] = (Predictor.load(cnn_bundle, backend=be), x_cnn[:32])
        rows[f"gallery_prototype {be}"] = (Predictor.load(enc_bundle, backend=be), x[:32])
        rows[f"gallery_knn1 {be}"] = (Predictor.load(knn_bundle, backend=be), x[:32])
    for name, (p, _) in rows.items():
        print(f"{name}: backend {p.runtime.backend}, {p.runtime.precision}")
    load0 = os.getloadavg()[0]
    results["ms_per_batch_of_32"] = _timings(rows, args.rounds, args.iters)
    print(f"{results['gallery_items']} gallery items; {args.rounds} rounds x {args.iters} "
          f"calls; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    _print_timings(results["ms_per_batch_of_32"], f"crop_cnn {backends[0]}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"-> {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
