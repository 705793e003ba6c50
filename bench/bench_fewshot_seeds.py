"""Few-shot accuracy of one source tree over several training seeds: for before/after
comparisons of a change to few-shot training (e.g. issue 18 moving it into the common loop).

Each run trains the Siamese encoder with ``train_fewshot`` from the tree given by ``--tree``
(its ``src/``, imported in this process) on the train chips of the 6 seen MSTAR SOC-10 classes
(the same split as ``bench_fewshot.py``: 4 classes held out, drawn with seed 0), then scores

* K-shot accuracy on the held-out classes (``bench_fewshot.kshot_episodes``: K random train
  chips per class enrolled, every test chip of those classes answered, 20 episodes per K),
* closed-set accuracy of the gallery of every seen train chip on the seen test chips
  (prototype scoring, torch encoder, no abstention).

Run it once per tree and seed, alternating trees (the accuracy does not depend on the load;
the training time does, so only accuracies are compared). One JSON line per run on stdout and
in ``OUT/seeds.json``.

``--recipe default`` trains with ``FewShotConfig(seed=..., num_threads=...)`` and nothing else
(what ``imgtriage train-fewshot DIR`` does with no options), for before/after comparisons of
the defaults; its ``train_s`` is then the figure to compare (take the bench lock, normal
priority). ``--data digits`` uses scikit-learn's 8x8 digits written as PNGs (half of each
class as train, half as test; 4 of the 10 classes held out) instead of MSTAR chips.

Usage (the CPU is shared: take the lock):
    for s in 0 1; do for t in /tmp/before /tmp/after; do
      flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_fewshot_seeds.py \\
          --tree $t --seed $s --out /tmp/fs-seeds/$(basename $t)-$s; done; done
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="source tree whose src/ to train "
                                                            "with (default: this one)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" /
                    "mstar-soc10")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-episodes", type=int, default=40)
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per K")
    ap.add_argument("--loss", default="proto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", choices=("fixed", "default"), default="fixed",
                    help="fixed: the options above; default: no few-shot option given")
    args = ap.parse_args()
    if str(args.data) == "digits":
        args.data = _digits_folder(args.out.parent / "digits-folder")
    sys.path.insert(0, str(args.tree.resolve() / "src"))
    sys.path.insert(0, str(REPO / "bench"))

    import torch

    import bench_fewshot as bf
    from imgtriage.data import write_manifest
    from imgtriage.predict import Predictor
    from imgtriage.train.fewshot import FewShotConfig, train_fewshot

    torch.set_num_threads(args.threads)
    classes = sorted(p.name for p in (args.data / "train").iterdir() if p.is_dir())
    held = sorted(np.random.default_rng(0).permutation(classes)[:4].tolist())
    seen = [c for c in classes if c not in held]
    paths, labels = bf._files(args.data / "train", seen)
    cfg = FewShotConfig(loss=args.loss, epochs=args.epochs, episodes=args.train_episodes,
                        n_way=5, k_shot=5, n_query=5, img_size=64, augment="flip", lr=2e-3,
                        seed=args.seed, num_threads=args.threads)
    if args.recipe == "default":
        cfg = FewShotConfig(seed=args.seed, num_threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = train_fewshot(write_manifest(args.out / "seen.csv", paths, labels), args.out, cfg,
                        quiet=True)
    seconds = time.perf_counter() - t0
    gallery = Predictor.load(res.bundle_path, backend="torch")
    kshot = bf.kshot_episodes(gallery.backend.encoder, gallery.spec, args.data, held,
                              [int(s) for s in args.shots.split(",")], args.episodes, seed=1)
    test_p, test_y = bf._files(args.data / "test", seen)
    closed = bf._accuracy(gallery, bf._decode(test_p, gallery.spec), test_y)
    out = {"tree": str(args.tree), "recipe": args.recipe, "data": str(args.data),
           "seed": args.seed, "train_s": round(seconds, 1),
           "metrics": res.metrics, "kshot": kshot, "closed_set_prototype": closed}
    print(json.dumps(out))
    (args.out / "seeds.json").write_text(json.dumps(out, indent=1))


def _digits_folder(root: Path) -> Path:
    """scikit-learn's digits as 8x8 PNGs: ``train/<digit>`` and ``test/<digit>``, half of each
    class in each (written once)."""
    if (root / "test").is_dir():
        return root
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for digit in range(10):
        idx = np.flatnonzero(d.target == digit)
        for part, chosen in (("train", idx[::2]), ("test", idx[1::2])):
            folder = root / part / f"d{digit}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8)).save(
                    folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":
    main()
