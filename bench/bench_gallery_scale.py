"""A gallery's fitted scale against the test-set optimum, over many K-shot draws (issue 15).

Every image of a data set's ``train`` and ``test`` splits goes once through the pretrained
gallery encoder (the ImageNet EfficientNet-Lite0 at its 224 px, as ``train-fewshot
--encoder pretrained`` enrols; torch here, the bundle's ONNX graph in the product path:
the same embeddings to float rounding), cached in ``--cache``. Then, for each round and shot
count K, K train images per class are drawn (seeded by round and K; ``--uneven``: each
class its own count, between 2 and 2K - 2) into a :class:`~imgtriage.models.gallery.Gallery`,
its scale is fitted by each rule of :mod:`imgtriage.predict.gallery_scale` on the enrolled
images held out in turn, and ``softmax(scale x similarity)`` on every test image is scored:
test NLL and 15-bin ECE at the fixed 10, at each rule's scale, and at the scale fitted on
the test similarities themselves ("oracle", reference only: no gallery can know it). Also
the similarity threshold ``train-fewshot`` fits (keep its default share of the enrolled
images answered correctly held out): the share of the correct test answers it keeps (and
of all test answers), fitted on plain leave-one-out similarities (``plain``, what it used
until session 8) and as a gallery fits it now (``default``,
:func:`~imgtriage.models.gallery.fit_similarity_threshold`: full-count similarities).

Rules: ``plain`` (session 7's fit: plain leave-one-out, the held-out item's own class a
prototype of K - 1 items, every row weighing alike), ``unweighted`` (the own-class similarity
at the prototype length of all K, :func:`~imgtriage.models.gallery.held_out_similarities`
``full_count``, every row alike) and ``default`` (what a gallery does now,
:func:`~imgtriage.predict.gallery_scale.held_out_scale`: that correction, every class
weighing alike in the NLL). With even counts the last two are the same fit. With even
counts also: ``symmetric`` (the alternative not chosen: one item held out of every class, the
scales fitted at ``K - 1`` and ``K - 2`` items extrapolated to ``K``) and ``fresh`` (a
control, not a rule: the scale fitted on K further train images per class the gallery never
saw, an ideal held-out set of the same size; what is left between it and the oracle is the
noise of a fit on K x classes images and any train/test shift).

Usage (accuracy and calibration only, nothing timed: no lock, nice 19)::

    PYTHONPATH=src nice -n 19 .venv/bin/python bench/bench_gallery_scale.py \\
        --data ../shared/datasets/cifar10-small --shots 3,5,10 --rounds 5
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
RULES = ("plain", "unweighted", "default")
EXTRA = ("symmetric", "fresh")  # even counts only: the alternative, and a control


def embed_split(data: Path, split: str, cache: Path, threads: int
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embeddings, class indices, class names) of ``data/split``, cached."""
    path = cache / f"{data.name}-{split}.npz"
    if path.exists():
        z = np.load(path)
        return z["emb"], z["y"], [str(c) for c in z["classes"]]
    import torch

    from imgtriage.predict.gallery_embed import embed_paths, encoder_runner, pretrained_encoder

    torch.set_num_threads(threads)
    classes = sorted(p.name for p in (data / split).iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((data / split / c).iterdir())]
    encoder, spec, _, _ = pretrained_encoder("efficientnet_lite0")
    encoder.eval()
    emb, kept, _ = embed_paths(encoder_runner(encoder), [f for f, _ in files], spec,
                               workers=threads, progress=True, label=f"{data.name}/{split}")
    y = np.array([files[i][1] for i in kept], np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=emb, y=y, classes=np.array(classes))
    return emb, y, classes


def draw(y: np.ndarray, n_classes: int, shots: int, rng: np.random.Generator, uneven: bool
         ) -> np.ndarray:
    """Row indices: ``shots`` per class (``uneven``: a count in [2, 2 shots - 2] each)."""
    rows = []
    for c in range(n_classes):
        k = int(rng.integers(2, max(3, 2 * shots - 1))) if uneven else shots
        rows.append(rng.choice(np.flatnonzero(y == c), k, replace=False))
    return np.concatenate(rows)


def _symmetric_sims(g, drop: int, rng: np.random.Generator) -> np.ndarray:
    """Held-out rows where *every* class has ``drop`` items fewer (the own class: the item
    and ``drop - 1`` random class-mates; the others: ``drop`` random items)."""
    e, lab = g.embeddings.astype(np.float64), g._label_ids
    members = [np.flatnonzero(lab == c) for c in range(len(g.classes))]
    sums = np.stack([e[m].sum(axis=0) for m in members])
    sims = np.full((len(e), len(members)), -np.inf)
    for i in range(len(e)):
        for c, m in enumerate(members):
            pool = m[m != i]
            k = drop - 1 if c == lab[i] else drop
            if len(pool) - k >= 1:
                d = rng.choice(pool, k, replace=False)
                s = sums[c] - e[d].sum(axis=0) - (e[i] if c == lab[i] else 0.0)
                sims[i, c] = e[i] @ s / np.linalg.norm(s)
    return sims


def symmetric_scale(g, shots: int, rng: np.random.Generator) -> float:
    """The alternative not chosen: scales fitted with every class at ``n - 1`` and ``n - 2``
    items, extrapolated to ``n`` linearly in ``log n`` (needs ``n >= 3``)."""
    from imgtriage.predict.gallery_scale import fit_scale

    lab = g._label_ids
    s1 = fit_scale(_symmetric_sims(g, 1, rng), lab, 10.0, rule="symmetric")[0]
    if shots < 3:
        return s1
    s2 = fit_scale(_symmetric_sims(g, 2, rng), lab, 10.0, rule="symmetric")[0]
    n = shots
    return s1 + (s1 - s2) * np.log(n / (n - 1)) / np.log((n - 1) / (n - 2))


def one_draw(train: tuple, test: tuple, shots: int, seed: int, uneven: bool) -> dict:
    from imgtriage.evaluate import expected_calibration_error, fit_temperature, softmax
    from imgtriage.evaluate import nll_at_temperature as nll
    from imgtriage.models.gallery import (
        Gallery,
        GalleryConfig,
        acceptance_threshold,
        fit_similarity_threshold,
        held_out_similarities,
    )
    from imgtriage.predict.gallery_scale import held_out_scale
    from imgtriage.train.fewshot import FewShotConfig

    (emb, y, classes), (temb, ty, _) = train, test
    rows = draw(y, len(classes), shots, np.random.default_rng([seed, shots, int(uneven)]),
                uneven)
    g = Gallery.build(emb[rows], [classes[i] for i in y[rows]], [str(i) for i in rows],
                      classes)
    sims = g.similarities(temb)
    out = {"round": seed, "shots": shots, "uneven": uneven, "n_items": len(rows),
           "accuracy": float((sims.argmax(1) == ty).mean())}
    scales = {"fixed10": 10.0}
    for rule in ("plain", "unweighted"):  # session 7's fit; the correction without weights
        ho, hy = held_out_similarities(g, full_count=rule == "unweighted")
        t, info = fit_temperature(ho * 10.0, hy)
        scales[rule] = 10.0 / t
        out[f"kept_{rule}"] = info["kept"]
    new, rec = held_out_scale(g, GalleryConfig())
    scales["default"] = new.scale
    out["kept_default"] = rec["kept"]
    if not uneven:
        scales["symmetric"] = symmetric_scale(g, shots, np.random.default_rng([seed, shots]))
        # control: K images per class the gallery never saw (an ideal held-out set)
        rest = np.setdiff1d(np.arange(len(y)), rows)
        fresh = rest[draw(y[rest], len(classes), shots, np.random.default_rng([seed, shots, 9]),
                          False)]
        scales["fresh"] = 10.0 / fit_temperature(g.similarities(emb[fresh]) * 10.0,
                                                 y[fresh])[0]
    scales["oracle"] = 10.0 / fit_temperature(sims * 10.0, ty)[0]
    # the similarity threshold (train-fewshot's keep rate): the share of the correct test
    # answers it keeps (and of all test answers), fitted on plain leave-one-out similarities
    # (session 8's fit, the baseline) and as a gallery fits it now (fit_similarity_threshold:
    # full-count similarities for prototype galleries)
    keep = FewShotConfig().keep_rate
    right, best = sims.argmax(1) == ty, sims.max(1)
    ho, hy = held_out_similarities(g)
    cuts = {"plain": acceptance_threshold(ho.max(1), ho.argmax(1) == hy, keep),
            "default": fit_similarity_threshold(g, GalleryConfig(), keep)[0]}
    for rule, t in cuts.items():
        kept = best >= t if t is not None else np.ones(len(best), bool)
        out[f"threshold_keeps_{rule}"] = float(kept[right].mean())
        out[f"threshold_coverage_{rule}"] = float(kept.mean())
    out["threshold_keep_rate"] = keep
    for name, s in scales.items():
        out[f"scale_{name}"] = float(s)
        out[f"nll_{name}"] = float(nll(sims * s, ty, 1.0))
        out[f"ece_{name}"] = float(expected_calibration_error(softmax(sims * s), ty))
    return out


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in sorted({(r["shots"], r["uneven"]) for r in rows}):
        mine = [r for r in rows if (r["shots"], r["uneven"]) == key]
        name = f"{key[0]}-shot" + (" uneven" if key[1] else "")
        stats = {}
        arms = [a for a in ("fixed10", *RULES, *EXTRA, "oracle") if f"scale_{a}" in mine[0]]
        for m in ("accuracy", *(f"threshold_{q}_{a}" for q in ("keeps", "coverage")
                                for a in ("plain", "default")),
                  *(f"{q}_{a}" for q in ("scale", "ece", "nll") for a in arms)):
            v = [r[m] for r in mine]
            stats[m] = _median_range(v)
        for rule in (a for a in arms if a not in ("fixed10", "oracle")):
            # distance to the oracle scale, log(scale / oracle) within draw: median (min-max)
            # and the mean of its absolute value
            v = [np.log(r[f"scale_{rule}"] / r["scale_oracle"]) for r in mine]
            stats[f"log_scale_over_oracle_{rule}"] = _median_range(v)
            stats[f"mean_abs_log_{rule}"] = round(float(np.mean(np.abs(v))), 4)
        stats["n"] = len(mine)
        out[name] = stats
    return out


def _median_range(v: list[float]) -> list[float]:
    """[median, min, max], rounded to 4 places."""
    return [round(float(np.median(v)), 4), round(min(v), 4), round(max(v), 4)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--shots", default="3,5,10")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--uneven", action="store_true", help="also per-class counts in [2, 2K-2]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/imgtriage-gallery-emb"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0, load0 = time.time(), os.getloadavg()[0]
    train = embed_split(args.data, "train", args.cache, args.threads)
    test = embed_split(args.data, "test", args.cache, args.threads)
    rows = []
    for uneven in ((False, True) if args.uneven else (False,)):
        for k in (int(s) for s in args.shots.split(",")):
            for r in range(args.rounds):
                rows.append(one_draw(train, test, k, r, uneven))
                print(json.dumps(rows[-1]), flush=True)
    result = {"data": str(args.data), "rounds": args.rounds, "seconds": time.time() - t0,
              "load_avg_1min": [load0, os.getloadavg()[0]], "rows": rows,
              "summary": summarise(rows)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
