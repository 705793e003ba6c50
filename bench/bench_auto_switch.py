"""Where should ``--model auto`` switch from the Siamese/prototype model to ``crop_cnn``?

The signal-crops recipe (one seed) found ``crop_cnn`` at 100 labels no better than the Siamese
model at 25. This bench trains both on the same label draws at several budgets, over several
seeds (each seed draws its own labels and initialises its own weights), interleaved
seed-major so the machine's load falls on both alike, and scores each on the MSTAR test crops
of the nine known classes (the recipe's crops, training recipe and epochs rule: ``--model`` is
the only difference). It reports per budget the median (min-max) test accuracy of each model
and the median (min-max) of the within-seed differences.

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_auto_switch.py \\
        --budgets 100,200 --seeds 0,1,2 --out /tmp/auto-switch
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
MODELS = ("siamese", "crop_cnn")


def _recipe() -> Any:
    path = REPO / "examples" / "signal-crops" / "run.py"
    spec = importlib.util.spec_from_file_location("signal_crops_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(recipe: Any, manifest: Path, run: Path, model: str, n: int, seed: int,
           threads: int) -> tuple[Path, float, int]:
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    epochs = max(2, round((4000 + 8 * n) / n))  # the recipe's rule for every budget
    cfg = TrainConfig(model=model, img_size=64, epochs=epochs, batch_size=32, lr=3e-3,
                      val_frac=0.0, augment="shift", scaling="percentile", seed=seed,
                      num_threads=threads, checkpoint_every=0)
    res = train(manifest, run, cfg, quiet=True)
    return res.bundle_path, res.seconds, epochs


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mstar", type=Path, default=SHARED / "mstar-soc10")
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-auto-switch"))
    ap.add_argument("--budgets", default="100,200")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from imgtriage.data import write_manifest
    from imgtriage.predict import Predictor

    torch.set_num_threads(args.threads)
    recipe = _recipe()
    out = args.out.resolve()
    counts = recipe.make_crops(args.mstar, out / "crops", 64, None, None, 0)
    classes = [c for c in counts["train"] if c != "ZSU234"]
    test = recipe._files(out / "crops" / "test", classes)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        for n in budgets:
            paths, labels = recipe.label_budget(out / "crops" / "train", classes, n, seed)
            manifest = write_manifest(out / f"labels-{n}-s{seed}.csv", paths, labels)
            for model in MODELS:
                t0 = time.perf_counter()
                bundle, secs, epochs = _train(recipe, manifest, out / f"{model}-{n}-s{seed}",
                                              model, n, seed, args.threads)
                acc = recipe.score(Predictor.load(bundle), *test)["accuracy"]
                rows.append({"seed": seed, "labels": n, "model": model, "epochs": epochs,
                             "train_seconds": round(secs, 1), "test_accuracy": acc})
                print(f"seed {seed} labels {n} {model}: {acc:.4f} ({epochs} epochs, "
                      f"{time.perf_counter() - t0:.0f}s)", flush=True)
    table = {}
    for n in budgets:
        acc = {m: [r["test_accuracy"] for r in rows if r["labels"] == n and r["model"] == m]
               for m in MODELS}
        diff = [a - b for a, b in zip(acc["siamese"], acc["crop_cnn"], strict=True)]
        table[n] = {m: _summary(v) for m, v in acc.items()}
        table[n]["siamese_minus_crop_cnn"] = _summary(diff)
        print(f"{n} labels: siamese {table[n]['siamese']}, crop_cnn {table[n]['crop_cnn']}, "
              f"siamese - crop_cnn {table[n]['siamese_minus_crop_cnn']} over {len(diff)} seeds")
    result = {"rows": rows, "summary": table, "test_files": len(test[0])}
    (out / "auto_switch.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
