"""Does ``--prior-correction auto``'s validation check keep the correction where it helps on
held-out data and drop it where it hurts?

Each run trains on an imbalanced folder of real images (scikit-learn digits, or MSTAR SOC-10
chips) with the recipe ``--model auto`` picks for imbalanced classes (square-root class
weights, best epoch by balanced accuracy: the correction is then ``auto``'s to check), or with
a plain loss selected by balanced accuracy (the full prior left to correct). It reads what
training decided (``run.json`` -> ``prior_correction``: validation balanced accuracy at the
plain and the corrected argmax, kept or dropped) and scores the test images with both
decisions (the bundle's logits through the torch backend, ``argmax(logits / T)`` against
``argmax(logits / T + offsets)``), so the rule auto chose can be compared with the other one on
data neither saw. One JSON line per run; a table of every run and the median (min-max) of the
within-run test differences (chosen - other) at the end.

Usage (accuracy only, nothing timed: run it at nice 19 outside the bench lock):
    nice -n 19 .venv/bin/python bench/bench_prior_check.py --seeds 0,1,2 --out /tmp/prior-check
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
# an imbalanced draw per class: the first classes common, the last rare (about 12:1)
DIGIT_COUNTS = (120, 90, 60, 40, 25, 10)
MSTAR_COUNTS = (200, 120, 60, 30, 15)
RECIPES = {"sqrt-weights": {"loss_strategy": "class_weights"},
           "plain-loss": {"loss_strategy": "none"}}


def _digits(out: Path, seed: int) -> tuple[Path, Path]:
    """Imbalanced train folder and a balanced test folder (every other digit of the class)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for digit, n in enumerate(DIGIT_COUNTS):
        idx = rng.permutation(np.flatnonzero(d.target == digit))
        for part, chosen in (("train", idx[:n]), ("test", idx[n:n + 50])):
            folder = out / part / f"d{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8)).resize(
                    (16, 16), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return out / "train", out / "test"


def _mstar(out: Path, seed: int) -> tuple[Path, Path]:
    """Imbalanced draw of MSTAR train chips of 5 classes; their test chips as they are."""
    root = SHARED / "mstar-soc10"
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())[:len(MSTAR_COUNTS)]
    rng = np.random.default_rng(seed)
    for c, n in zip(classes, MSTAR_COUNTS, strict=True):
        files = sorted((root / "train" / c).glob("*"))
        for part, chosen in (("train", [files[i] for i in rng.permutation(len(files))[:n]]),
                             ("test", sorted((root / "test" / c).glob("*"))[:100])):
            folder = out / part / c
            folder.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (folder / f.name).symlink_to(f)
    return out / "train", out / "test"


def _balanced(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def run(data: str, recipe: str, seed: int, out: Path, threads: int) -> dict[str, Any]:
    from imgtriage.data import discover
    from imgtriage.predict import Predictor
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    work = out / f"{data}-{recipe}-{seed}"
    train_dir, test_dir = (_digits if data == "digits" else _mstar)(work / "data", seed)
    size = 16 if data == "digits" else 48
    cfg = TrainConfig(model="crop_cnn", img_size=size, epochs=8 if data == "digits" else 10,
                      batch_size=32, lr=3e-3, val_frac=0.25, seed=seed, num_threads=threads,
                      select_metric="val_balanced_accuracy", checkpoint_every=0,
                      **RECIPES[recipe])
    res = train(train_dir, work / "run", cfg, quiet=True)
    said = json.loads((work / "run" / "run.json").read_text())["prior_correction"]
    p = Predictor.load(res.bundle_path, backend="torch", num_threads=threads)
    samples = discover(test_dir).samples
    x = np.stack([p.decode_bytes([Path(s.path).read_bytes()])[0].x for s in samples])
    y = np.array([p.classes.index(s.label) for s in samples])
    z = p.logits(x) / p.policy.temperature
    offsets = np.array(list(said["offsets"].values()))
    test = {"plain": _balanced(z.argmax(1), y),
            "corrected": _balanced((z + offsets).argmax(1), y)}
    kept = bool(said["applied"])
    chosen, other = ("corrected", "plain") if kept else ("plain", "corrected")
    row = {"data": data, "recipe": recipe, "seed": seed, "kept": kept,
           "val_plain": said["plain"]["balanced_accuracy"],
           "val_corrected": said["corrected"]["balanced_accuracy"],
           "test_plain": test["plain"], "test_corrected": test["corrected"],
           "test_chosen_minus_other": test[chosen] - test[other], "line": said["line"],
           "train_s": round(res.seconds, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits,mstar")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-prior-check"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = [run(d, r, int(s), args.out, args.threads) for d in args.data.split(",")
            for r in args.recipes.split(",") for s in args.seeds.split(",")]
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    print("| data | recipe | seed | val BA plain | val BA corrected | kept | test BA plain | "
          "test BA corrected | test: chosen - other |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['recipe']} | {r['seed']} | {r['val_plain']:.3f} | "
              f"{r['val_corrected']:.3f} | {'kept' if r['kept'] else 'dropped'} | "
              f"{r['test_plain']:.3f} | {r['test_corrected']:.3f} | "
              f"{r['test_chosen_minus_other']:+.3f} |")
    diffs = [r["test_chosen_minus_other"] for r in rows]
    print(f"test balanced accuracy, the rule auto chose minus the other: median "
          f"{statistics.median(diffs):+.3f} ({min(diffs):+.3f} to {max(diffs):+.3f}), "
          f"{len(diffs)} runs; kept in {sum(r['kept'] for r in rows)}")


if __name__ == "__main__":
    main()
