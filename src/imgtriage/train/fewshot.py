"""Few-shot training: an embedding net learnt from balanced episodes, saved as a gallery bundle.

Two objectives, both on L2-normalised embeddings:

* ``proto`` (prototypical episodes): each episode draws ``n_way`` classes with ``k_shot``
  support and ``n_query`` query crops each; queries are classified by cosine similarity to
  the support means (``scale`` x cosine as logits, cross entropy).
* ``triplet``: the same balanced P x K batches; every positive pair is matched with a
  ``semihard`` negative (the closest one still farther than the positive; FaceNet) or with the
  ``hard`` batch extremes (hardest positive and negative per anchor), margin loss.

The run directory mirrors ``imgtriage train`` (config.json, splits.csv, metrics.jsonl,
defects.json, bundle/); the bundle is of kind ``gallery`` with every training crop enrolled
and a similarity threshold fitted on the validation split (see :mod:`imgtriage.predict.gallery`).

Example:
    >>> from imgtriage.train.fewshot import FewShotConfig, train_fewshot
    >>> res = train_fewshot("data/crops", "runs/fs", FewShotConfig(epochs=5))  # doctest: +SKIP
    >>> res.metrics["val_accuracy"]  # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from imgtriage.errors import DataError
from imgtriage.train.fewshot_config import AUGMENTS, LOSSES, MINING, FewShotConfig

__all__ = ["AUGMENTS", "LOSSES", "MINING", "EpisodeSampler", "FewShotConfig", "FewShotResult",
           "train_fewshot"]

# -- balanced sampling ----------------------------------------------------------------------
class EpisodeSampler:
    """Balanced episodes: ``n_way`` classes (cycling through a shuffled class order, so every
    class appears equally often), ``per_class`` items each (without replacement where the
    class has enough, with replacement otherwise).

    Example:
        >>> s = EpisodeSampler(np.array([0, 0, 0, 1, 1, 2]), n_way=2, per_class=2, seed=0)
        >>> idx, y = s.sample()
        >>> len(idx), y.tolist()
        (4, [0, 0, 1, 1])
    """

    def __init__(self, labels: np.ndarray, n_way: int, per_class: int, seed: int = 0) -> None:
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        if len(self.by_class) < 2:
            raise DataError("few-shot training needs at least 2 classes with training images")
        self.n_way = min(n_way, len(self.by_class))
        self.per_class = per_class
        self.rng = np.random.default_rng(seed)
        self._queue: list[int] = []

    def _next_classes(self) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < self.n_way:
            if not self._queue:
                self._queue = list(self.rng.permutation(len(self.by_class)))
            c = int(self._queue.pop())
            if c not in chosen:
                chosen.append(c)
        return chosen

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        idx, ys = [], []
        for j, c in enumerate(self._next_classes()):
            pool = self.by_class[c]
            replace_ = len(pool) < self.per_class
            idx.append(self.rng.choice(pool, self.per_class, replace=replace_))
            ys.append(np.full(self.per_class, j))
        return np.concatenate(idx), np.concatenate(ys)


# -- losses -----------------------------------------------------------------------------------
def prototypical_loss(emb: torch.Tensor, n_way: int, k_shot: int, scale: float
                      ) -> tuple[torch.Tensor, float]:
    """Episode laid out class by class (``k_shot`` support then the queries of each class):
    cross entropy of the queries against the normalised support means; (loss, accuracy)."""
    d = emb.shape[1]
    per = emb.view(n_way, -1, d)
    protos = F.normalize(per[:, :k_shot].mean(1), dim=1)
    queries = per[:, k_shot:].reshape(-1, d)
    target = torch.arange(n_way).repeat_interleave(per.shape[1] - k_shot)
    logits = scale * queries @ protos.T
    loss = F.cross_entropy(logits, target)
    return loss, float((logits.argmax(1) == target).float().mean())


def triplet_loss(emb: torch.Tensor, y: torch.Tensor, margin: float, mining: str = "semihard"
                 ) -> tuple[torch.Tensor, float]:
    """Margin loss on squared distances of unit vectors (``2 - 2 cos``), mined in the batch.

    ``semihard``: for each positive pair (a, p), the closest negative with d(a, n) > d(a, p),
    or the farthest negative when none is (TF/FaceNet rule). ``hard``: per anchor, the
    farthest positive and the closest negative. Returns (loss, share of active triplets).
    """
    dist = (2 - 2 * emb @ emb.T).clamp_min(0)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool)
    pos, neg = same & ~eye, ~same
    big = torch.finfo(dist.dtype).max
    if mining == "hard":
        d_ap = dist.masked_fill(~pos, -1).max(1).values
        d_an = dist.masked_fill(~neg, big).min(1).values
        valid = pos.any(1) & neg.any(1)
        losses = F.relu(d_ap - d_an + margin)[valid]
    else:
        a, p = pos.nonzero(as_tuple=True)
        d_ap = dist[a, p]
        d_neg = dist[a]  # (P, B)
        is_neg = neg[a]
        outside = is_neg & (d_neg > d_ap[:, None])
        semi = d_neg.masked_fill(~outside, big).min(1).values
        hardest = d_neg.masked_fill(~is_neg, -1).max(1).values
        d_an = torch.where(outside.any(1), semi, hardest)
        losses = F.relu(d_ap - d_an + margin)[is_neg.any(1)]
    if losses.numel() == 0:
        return emb.sum() * 0.0, 0.0
    return losses.mean(), float((losses > 0).float().mean())


# -- augmentation (geometric only: safe for SAR, astronomy and microscopy crops) --------------
def augment_episode(x: torch.Tensor, policy: str, g: torch.Generator) -> torch.Tensor:
    """``flip``: random horizontal flips; ``d4``: flips and 90-degree turns (square inputs)."""
    if policy == "none":
        return x
    out = x.clone()
    flip = torch.rand(len(x), generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    if policy == "d4" and x.shape[-1] == x.shape[-2]:
        k = torch.randint(0, 4, (len(x),), generator=g)
        for r in (1, 2, 3):
            sel = k == r
            out[sel] = torch.rot90(out[sel], r, dims=(-2, -1))
    return out


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class EncoderFit:
    """Best encoder weights (by validation gallery accuracy), their epoch, every epoch's log."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]


def _episode_loss(encoder: torch.nn.Module, x: torch.Tensor, idx: np.ndarray, y: np.ndarray,
                  cfg: FewShotConfig, n_way: int, g: torch.Generator
                  ) -> tuple[torch.Tensor, float]:
    emb = encoder(augment_episode(x[torch.from_numpy(idx)], cfg.augment, g))
    if cfg.loss == "proto":
        return prototypical_loss(emb, n_way, cfg.k_shot, cfg.scale)
    return triplet_loss(emb, torch.from_numpy(y), cfg.margin, cfg.mining)


def gallery_accuracy(encoder: torch.nn.Module, support: tuple[np.ndarray, np.ndarray],
                     query: tuple[np.ndarray, np.ndarray], method: str = "prototype",
                     k: int = 1) -> tuple[float, np.ndarray, np.ndarray]:
    """Accuracy of a gallery of ``support`` crops on ``query`` crops; also each query's best
    similarity and whether it was right (to fit the abstain threshold)."""
    from imgtriage.models.gallery import Gallery, embed

    encoder.eval()
    ys, yq = support[1], query[1]
    g = Gallery.build(embed(encoder, support[0]), [str(v) for v in ys], [""] * len(ys),
                      [str(c) for c in np.unique(ys)])
    sims = g.similarities(embed(encoder, query[0]), method, k)
    pred = np.array([int(c) for c in g.classes])[sims.argmax(1)]
    correct = pred == yq
    return float(correct.mean()) if len(yq) else float("nan"), sims.max(1), correct


def fit_encoder(encoder: torch.nn.Module, train_xy: tuple[np.ndarray, np.ndarray],
                val_xy: tuple[np.ndarray, np.ndarray] | None, cfg: FewShotConfig, *,
                log_path: str | Path | None = None, quiet: bool = True) -> EncoderFit:
    """Episodic training of ``encoder``; the best epoch by validation gallery accuracy (the
    gallery is the training crops) wins, or the last epoch without validation data."""
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.as_tensor(train_xy[0]), np.asarray(train_xy[1])
    per_class = cfg.k_shot + cfg.n_query
    sampler = EpisodeSampler(y, cfg.n_way, per_class, cfg.seed)
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * cfg.episodes
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20))
        * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    fit = EncoderFit({}, 0, [])
    best = -1.0
    for epoch in range(1, cfg.epochs + 1):
        t0, losses, accs = time.perf_counter(), [], []
        encoder.train()
        for _ in range(cfg.episodes):
            idx, ey = sampler.sample()
            loss, acc = _episode_loss(encoder, x, idx, ey, cfg, sampler.n_way, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            accs.append(acc)
        stat = "train_episode_accuracy" if cfg.loss == "proto" else "train_active_triplets"
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), stat: float(np.mean(accs)),
               "lr": opt.param_groups[0]["lr"]}
        if val_xy is not None and len(val_xy[1]):
            row["val_accuracy"] = gallery_accuracy(encoder, train_xy, val_xy, cfg.method,
                                                   cfg.knn_k)[0]
        row["seconds"] = round(time.perf_counter() - t0, 3)
        fit.history.append(row)
        score = row.get("val_accuracy", float(epoch))
        if score > best:
            best, fit.best_epoch = score, epoch
            fit.best_state = copy.deepcopy(encoder.state_dict())
        _log(row, log_path, quiet)
    encoder.load_state_dict(fit.best_state)
    return fit


def _log(row: dict[str, Any], log_path: str | Path | None, quiet: bool) -> None:
    if log_path:
        with Path(log_path).open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                            f"{k}={v}" for k, v in row.items()))


def similarity_threshold(best_sims: np.ndarray, correct: np.ndarray, keep_rate: float
                         ) -> float | None:
    """The similarity that keeps ``keep_rate`` of the correctly answered validation crops
    (None when there are none: the gallery then never abstains).

    Example:
        >>> similarity_threshold(np.array([0.9, 0.8, 0.7, 0.2]), np.array([1, 1, 1, 0], bool),
        ...                      keep_rate=2 / 3)
        0.8
    """
    from imgtriage.models.gallery import acceptance_threshold

    return acceptance_threshold(best_sims, correct, keep_rate)


# -- from a folder to a gallery bundle ---------------------------------------------------------
@dataclass(frozen=True)
class FewShotResult:
    run_dir: Path
    bundle_path: Path
    metrics: dict[str, Any]
    seconds: float


def _load_splits(data: str | os.PathLike[str], run: Path, cfg: FewShotConfig) -> tuple:
    from imgtriage.data import (
        PreprocessSpec,
        discover,
        samples_by_split,
        split_dataset,
        write_split_manifest,
    )
    from imgtriage.data.loaders import decode_samples, detect_in_chans

    ds = split_dataset(discover(data), val_frac=cfg.val_frac, test_frac=0.0, seed=cfg.seed)
    write_split_manifest(ds, run / "splits.csv")
    parts = samples_by_split(ds)
    in_chans = cfg.in_chans or detect_in_chans(parts["train"])
    spec = PreprocessSpec.default_for(in_chans, (cfg.img_size, cfg.img_size),
                                      scaling=cfg.scaling)
    tr = decode_samples(parts["train"], ds.classes, spec, workers=cfg.decode_workers)
    va = decode_samples(parts.get("val", []), ds.classes, spec, workers=cfg.decode_workers)
    defects = [d.to_dict() for d in (*tr.defects, *va.defects)]
    defects += [{"path": p, "issue": "unsupported_format", "message": why}
                 for p, why in ds.ignored]
    (run / "defects.json").write_text(json.dumps(defects, indent=2))
    if len(np.unique(tr.y)) < 2:
        raise DataError("few-shot training needs usable training images of at least 2 "
                        "classes; see defects.json")
    return ds, spec, tr, va


def train_fewshot(data: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  cfg: FewShotConfig = FewShotConfig(), *, quiet: bool = False) -> FewShotResult:
    """Discover, split, decode, train the encoder episodically, enrol every training crop and
    fit the similarity threshold on the validation split; save ``OUT/bundle`` (kind gallery).

    Example:
        >>> res = train_fewshot("data/crops", "runs/fs")  # doctest: +SKIP
        >>> res.bundle_path  # doctest: +SKIP
        PosixPath('runs/fs/bundle')
    """
    from imgtriage.models.gallery import Gallery, GalleryConfig, embed, fit_similarity_threshold
    from imgtriage.models.siamese import build_encoder
    from imgtriage.predict.gallery import new_gallery_manifest, save_gallery_bundle

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    ds, spec, tr, va = _load_splits(data, run, cfg)
    cfg = replace(cfg, in_chans=spec.in_chans)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (run / "metrics.jsonl").unlink(missing_ok=True)
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(spec.in_chans, **cfg.encoder_kwargs())
    val = (va.x, va.y) if len(va.y) else None
    fit = fit_encoder(encoder, (tr.x, tr.y), val, cfg, log_path=run / "metrics.jsonl",
                      quiet=quiet)
    threshold, metrics = None, {"best_epoch": fit.best_epoch, "train_count": len(tr.y)}
    if val is not None:
        acc, best, correct = gallery_accuracy(encoder, (tr.x, tr.y), val, cfg.method, cfg.knn_k)
        threshold = similarity_threshold(best, correct, cfg.keep_rate)
        metrics.update(val_accuracy=acc, val_count=len(va.y),
                       val_coverage=(float(np.mean(best >= threshold))
                                     if threshold is not None else 1.0))
    present = {ds.classes[i] for i in tr.y}
    gallery = Gallery.build(embed(encoder, tr.x), [ds.classes[i] for i in tr.y],
                            [s.path for s in tr.samples], [c for c in ds.classes if c in present])
    gcfg = GalleryConfig(method=cfg.method, k=cfg.knn_k, scale=cfg.scale,
                         similarity_threshold=threshold)
    rule = f"keep {cfg.keep_rate:.0%} of correct validation crops"
    if val is None:  # no held-out split: hold out each enrolled crop in turn
        threshold, fit = fit_similarity_threshold(gallery, gcfg, cfg.keep_rate)
        gcfg = replace(gcfg, similarity_threshold=threshold)
        metrics["threshold_fit"] = fit
        rule = f"keep {cfg.keep_rate:.0%} of the enrolled crops answered correctly left-one-out"
    manifest = new_gallery_manifest(
        encoder_kwargs=cfg.encoder_kwargs(), in_chans=spec.in_chans, preprocess=spec.to_dict(),
        gallery=gallery, config=gcfg, metrics=metrics,
        training={"config": cfg.to_dict(), "counts": ds.counts(), "data": str(data),
                  "kind": "fewshot", "threshold_rule": rule})
    check = np.asarray((va.x if len(va.y) else tr.x)[:16], dtype=np.float32)
    bundle = save_gallery_bundle(run / "bundle", manifest, encoder.state_dict(), gallery,
                                 x_check=check)  # the encoder's graph, checked on val crops
    seconds = time.perf_counter() - t0
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(f"best epoch {fit.best_epoch}: {metrics} | similarity "
                                   f"threshold {threshold} | bundle: {bundle} | {seconds:.1f}s")
    return FewShotResult(run, bundle, metrics, seconds)
