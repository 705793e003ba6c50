"""Few-shot training: an embedding net learnt from balanced episodes, saved as a gallery bundle.

Two objectives, both on L2-normalised embeddings:

* ``proto`` (prototypical episodes): each episode draws ``n_way`` classes with ``k_shot``
  support and ``n_query`` query crops each; queries are classified by cosine similarity to
  the support means (``scale`` x cosine as logits, cross entropy).
* ``triplet``: the same balanced P x K batches; every positive pair is matched with a
  ``semihard`` negative (the closest one still farther than the positive; FaceNet) or with the
  ``hard`` batch extremes (hardest positive and negative per anchor), margin loss.

Training is the common loop's (:func:`imgtriage.train.loop.fit`): the episode sampler
and the metric loss are the only few-shot parts, plugged in as an
:class:`~imgtriage.train.objective.Objective` (:class:`EpisodicObjective`), so the optimiser,
the schedule, progress lines, the metrics log, early stopping (``--patience``), checkpoints
and exact resume are those of ``imgtriage train``, and :class:`FewShotConfig` shares
:class:`~imgtriage.train.config.TrainConfig`'s checks (``FewShotConfig.train_config``).

The run directory mirrors ``imgtriage train`` (config.json, splits.csv, metrics.jsonl,
curves.png, defects.json, checkpoint/, bundle/); the bundle is of kind ``gallery`` with every
training crop enrolled and a similarity threshold fitted on the validation split (see
:mod:`imgtriage.predict.gallery`). The result is the :class:`~imgtriage.train.run.TrainResult`
of ``imgtriage train``.

Example:
    >>> from imgtriage.train.fewshot import FewShotConfig, train_fewshot
    >>> res = train_fewshot("data/crops", "runs/fs", FewShotConfig(epochs=5))  # doctest: +SKIP
    >>> res.metrics["val_accuracy"]  # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from imgtriage.errors import ConfigError, DataError
from imgtriage.train.distributed import DistInfo
from imgtriage.train.fewshot_config import (
    AUGMENTS,
    DEFAULT_EPISODES,
    EPISODIC_SIZE,
    LOSSES,
    MINING,
    FewShotConfig,
)
from imgtriage.train.loop import FitResult
from imgtriage.train.run import TrainResult

__all__ = ["AUGMENTS", "LOSSES", "MINING", "EpisodeSampler", "EpisodicObjective",
           "FewShotConfig", "FewShotResult", "train_fewshot"]

FewShotResult = TrainResult  # the result of every training run (kept for older imports)

# -- balanced episodes: the sampler of the common loop ---------------------------------------
class EpisodeSampler:
    """Balanced episodes: ``n_way`` classes (cycling through a shuffled class order, so every
    class appears equally often), ``per_class`` items each (without replacement where the
    class has enough, with replacement otherwise), laid out class by class.

    As the common loop's sampler (:class:`~imgtriage.train.objective.EpochSampler`) it yields
    the indices of ``episodes`` episodes per epoch, drawn from the seed, the epoch and the
    rank alone, so its checkpointed state is the epoch number and resuming is exact.
    :meth:`sample` draws the next episode of the current stream.

    Example:
        >>> s = EpisodeSampler(np.array([0, 0, 0, 1, 1, 2]), n_way=2, per_class=2, seed=0)
        >>> idx, y = s.sample()
        >>> len(idx), y.tolist(), len(s)
        (4, [0, 0, 1, 1], 4)
    """

    def __init__(self, labels: np.ndarray, n_way: int, per_class: int, seed: int = 0,
                 episodes: int = 1, rank: int = 0) -> None:
        labels = np.asarray(labels)
        self.by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        if len(self.by_class) < 2:
            raise DataError("few-shot training needs at least 2 classes with training images")
        self.n_way = min(n_way, len(self.by_class))
        self.per_class, self.episodes = per_class, episodes
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0
        self._restart()

    def _restart(self) -> None:
        self.rng = np.random.default_rng([self.seed, self.epoch, self.rank, 0xE915])
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
        """The next episode: (indices, episode class 0..n_way-1 of each)."""
        idx, ys = [], []
        for j, c in enumerate(self._next_classes()):
            pool = self.by_class[c]
            replace_ = len(pool) < self.per_class
            idx.append(self.rng.choice(pool, self.per_class, replace=replace_))
            ys.append(np.full(self.per_class, j))
        return np.concatenate(idx), np.concatenate(ys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._restart()

    def __iter__(self) -> Iterator[int]:
        self._restart()
        for _ in range(self.episodes):
            yield from self.sample()[0].tolist()

    def __len__(self) -> int:
        return self.episodes * self.n_way * self.per_class

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "n_way": self.n_way,
                "per_class": self.per_class, "episodes": self.episodes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "n_way", "per_class", "episodes"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(f"the checkpoint's episodes have {key}={state.get(key)!r}, "
                                  f"this run {getattr(self, key)!r}; resume with the same "
                                  "settings (--resume)")
        self.set_epoch(int(state["epoch"]))


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


# -- what the common loop trains for ------------------------------------------------------------
@dataclass(frozen=True)
class EpisodicObjective:
    """The few-shot :class:`~imgtriage.train.objective.Objective` of the common loop:
    balanced episodes in, a metric loss on the embeddings, gallery accuracy to validate.

    ``proto``: ``n_way`` x (``k_shot`` support + ``n_query`` queries) per episode, queries
    against the support means; ``triplet``: the same balanced batches, margin loss mined in
    the batch. Validation enrols every training crop and answers the validation crops
    (``method``/``knn_k``: how the gallery scores), the ``val_accuracy`` the loop keeps the
    best epoch by.

    Example:
        >>> obj = EpisodicObjective("proto", n_way=2, k_shot=1, n_query=1, episodes=2)
        >>> emb = torch.nn.functional.normalize(torch.eye(2)[[0, 0, 1, 1]], dim=1)
        >>> loss, acc = obj.loss(emb, torch.tensor([3, 3, 5, 5]))
        >>> acc
        1.0
    """

    kind: str = "proto"  # --loss
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 5
    episodes: int = 100
    mining: str = "semihard"
    margin: float = 0.2
    scale: float = 10.0
    method: str = "prototype"
    knn_k: int = 1

    @classmethod
    def from_config(cls, cfg: FewShotConfig, num_classes: int) -> EpisodicObjective:
        """The objective of ``cfg`` for ``num_classes`` training classes (``n_way`` at most
        that many)."""
        episodes = cfg.episodes if cfg.episodes is not None else DEFAULT_EPISODES
        return cls(cfg.loss, n_way=min(cfg.n_way, num_classes), k_shot=cfg.k_shot,
                   n_query=cfg.n_query, episodes=episodes, mining=cfg.mining,
                   margin=cfg.margin, scale=cfg.start_scale(), method=cfg.method, knn_k=cfg.knn_k)

    @property
    def stat(self) -> str:
        return "train_episode_accuracy" if self.kind == "proto" else "train_active_triplets"

    def sampler(self, labels: np.ndarray, seed: int, dist: DistInfo) -> EpisodeSampler:
        return EpisodeSampler(labels, self.n_way, self.k_shot + self.n_query, seed,
                              episodes=self.episodes, rank=dist.rank)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.kind == "proto":
            return prototypical_loss(out, self.n_way, self.k_shot, self.scale)
        return triplet_loss(out, y, self.margin, self.mining)

    def validate(self, model: torch.nn.Module, train: Any, val: Any) -> dict[str, float]:
        acc = gallery_accuracy(model, (train.x.numpy(), train.labels),
                               (val.x.numpy(), val.labels), self.method, self.knn_k)[0]
        return {"val_accuracy": acc}

    def settings(self) -> dict[str, Any]:
        """Named as the ``imgtriage train-fewshot`` options that set them."""
        d = asdict(self)
        return {"loss": d.pop("kind"), **d}


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
                log_path: str | Path | None = None, quiet: bool = True,
                checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                callbacks: Sequence[Any] = ()) -> FitResult:
    """Episodic training of ``encoder`` in the common loop (:func:`imgtriage.train.loop.fit`
    with :class:`EpisodicObjective`); the best epoch by validation gallery accuracy (the
    gallery is the training crops) wins, or the last epoch without validation data.
    ``checkpoint_dir``/``resume_from``/``callbacks`` are the loop's."""
    from imgtriage.train.loop import fit

    y = np.asarray(train_xy[1])
    n_classes = len(np.unique(y))
    if n_classes < 2:
        raise DataError("few-shot training needs at least 2 classes with training images")
    val = val_xy if val_xy is not None and len(val_xy[1]) else None
    cfg = cfg.sized(len(y), n_classes, val is not None)[0]  # --episodes/--patience not given
    return fit(encoder, (train_xy[0], y), val, cfg.train_config(n_classes), log_path=log_path,
               show_progress=not quiet, callbacks=callbacks, checkpoint_dir=checkpoint_dir,
               resume_from=resume_from, objective=EpisodicObjective.from_config(cfg, n_classes))


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
def _split(data: str | os.PathLike[str], run: Path, cfg: FewShotConfig
           ) -> tuple[Any, int, str | None, str]:
    """The split dataset (written to ``splits.csv``), its input channels and the encoder:
    ``(dataset, in_chans, pretrained backbone or None for episodic, why)``. A pretrained
    encoder picks no epoch, so it holds nothing out: every image is enrolled."""
    from imgtriage.data import discover, split_dataset, write_split_manifest
    from imgtriage.data.loaders import detect_in_chans
    from imgtriage.train.fewshot_pretrained import choose_encoder

    found = discover(data)
    in_chans = cfg.in_chans or detect_in_chans([s for s in found.samples
                                                if s.split in (None, "train")])
    backbone, why = choose_encoder(cfg, in_chans)
    ds = split_dataset(found, val_frac=0.0 if backbone else cfg.val_frac, test_frac=0.0,
                       seed=cfg.seed)
    write_split_manifest(ds, run / "splits.csv")
    return ds, in_chans, backbone, why


def _load_splits(ds: Any, in_chans: int, run: Path, cfg: FewShotConfig) -> tuple:
    from imgtriage.data import PreprocessSpec, samples_by_split
    from imgtriage.data.loaders import decode_samples

    parts = samples_by_split(ds)
    side = cfg.img_size or EPISODIC_SIZE
    spec = PreprocessSpec.default_for(in_chans, (side, side), scaling=cfg.scaling)
    tr = decode_samples(parts["train"], ds.classes, spec, workers=cfg.decode_workers)
    va = decode_samples(parts.get("val", []), ds.classes, spec, workers=cfg.decode_workers)
    defects = [d.to_dict() for d in (*tr.defects, *va.defects)]
    defects += ds.found_rows()
    (run / "defects.json").write_text(json.dumps(defects, indent=2))
    if len(np.unique(tr.y)) < 2:
        raise DataError("few-shot training needs usable training images of at least 2 "
                        "classes; see defects.json")
    return spec, tr, va


def _threshold(encoder: torch.nn.Module, classes: Sequence[str], tr: Any, va: Any,
               cfg: FewShotConfig) -> tuple[Any, Any, dict[str, Any], str]:
    """The gallery of every training crop, its config with the fitted scale and similarity
    threshold, the validation metrics (with the scale's record, ``scale_fit``) and the rule
    the threshold was fitted by."""
    from imgtriage.models.gallery import Gallery, GalleryConfig, embed, fit_similarity_threshold

    encoder.eval()  # enrol with the running batch-norm statistics, as prediction will
    present = {classes[i] for i in tr.y}
    gallery = Gallery.build(embed(encoder, tr.x), [classes[i] for i in tr.y],
                            [s.path for s in tr.samples], [c for c in classes if c in present])
    gcfg = GalleryConfig(method=cfg.method, k=cfg.knn_k, scale=cfg.start_scale())
    if not len(va.y):  # no held-out split: hold out each enrolled crop in turn
        threshold, fitted = fit_similarity_threshold(gallery, gcfg, cfg.keep_rate)
        gcfg, scale_fit = _scale(gallery, gcfg, cfg)
        return (gallery, replace(gcfg, similarity_threshold=threshold),
                {"threshold_fit": fitted, "scale_fit": scale_fit},
                f"keep {cfg.keep_rate:.0%} of the enrolled crops answered correctly left-one-out"
                + (f" ({fitted['correction']})" if fitted["correction"] else ""))
    acc, best, correct = gallery_accuracy(encoder, (tr.x, tr.y), (va.x, va.y), cfg.method,
                                          cfg.knn_k)
    threshold = similarity_threshold(best, correct, cfg.keep_rate)
    gcfg, scale_fit = _scale(gallery, gcfg, cfg, (embed(encoder, va.x),
                                                  [classes[i] for i in va.y]))
    metrics = {"val_accuracy": acc, "val_count": len(va.y),
               "val_coverage": (float(np.mean(best >= threshold)) if threshold is not None
                                else 1.0), "scale_fit": scale_fit}
    return (gallery, replace(gcfg, similarity_threshold=threshold), metrics,
            f"keep {cfg.keep_rate:.0%} of correct validation crops")


def _scale(gallery: Any, gcfg: Any, cfg: FewShotConfig,
           val: tuple[np.ndarray, Sequence[str]] | None = None) -> tuple[Any, dict[str, Any]]:
    """``gcfg`` with its scale fitted (the validation crops ``val``, (embeddings, labels),
    when there are any of enrolled classes, else the enrolled crops held out in turn), or as
    given by ``--scale``; and the record (:mod:`imgtriage.predict.gallery_scale`)."""
    from imgtriage.predict.gallery_scale import VAL_RULE, fit_scale, given_or_held_out

    if val is not None and cfg.scale is None:
        index = {c: i for i, c in enumerate(gallery.classes)}
        mine = np.array([c in index for c in val[1]], bool)
        if mine.any():
            y = np.array([index[c] for c, m in zip(val[1], mine, strict=True) if m])
            sims = gallery.similarities(val[0][mine], gcfg.method, gcfg.k)
            scale, rec = fit_scale(sims, y, gcfg.scale, rule=VAL_RULE)
            return replace(gcfg, scale=scale), rec
    return given_or_held_out(gallery, gcfg, cfg.scale is not None)


def train_fewshot(data: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  cfg: FewShotConfig = FewShotConfig(), *, quiet: bool = False,
                  resume: bool = False) -> TrainResult:
    """Discover, split, decode, train the encoder episodically in the common loop, enrol
    every training crop and fit the similarity threshold on the validation split; save
    ``OUT/bundle`` (kind gallery). ``resume=True`` continues ``OUT/checkpoint`` exactly
    (same settings required), as ``imgtriage train --resume`` does.

    With a pretrained encoder (``cfg.encoder``; ``auto`` picks it for colour photos when the
    weights are installed) nothing is trained: every image is enrolled through the backbone
    (:mod:`imgtriage.train.fewshot_pretrained`).

    Example:
        >>> res = train_fewshot("data/crops", "runs/fs")  # doctest: +SKIP
        >>> res.bundle_path  # doctest: +SKIP
        PosixPath('runs/fs/bundle')
    """
    from imgtriage.models.siamese import build_encoder
    from imgtriage.predict.gallery import new_gallery_manifest, save_gallery_bundle
    from imgtriage.train.checkpoint import find_checkpoint
    from imgtriage.train.plots import plot_curves
    from imgtriage.train.run import set_threads

    t0 = time.perf_counter()
    set_threads(cfg.num_threads)
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    ds, in_chans, backbone, why = _split(data, run, cfg)
    if backbone is not None:  # nothing to train: enrol every image through the backbone
        from imgtriage.train.fewshot_pretrained import enrol_pretrained

        return enrol_pretrained(data, run, cfg, ds, backbone, why, quiet=quiet, t0=t0)
    if not quiet and cfg.encoder == "auto":
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"encoder: {why}", highlight=False)
    ckpt = find_checkpoint(run) if resume else None
    spec, tr, va = _load_splits(ds, in_chans, run, cfg)
    cfg, schedule = replace(cfg, in_chans=spec.in_chans, encoder="episodic",
                            img_size=spec.size[0]).sized(len(tr.y), len(np.unique(tr.y)),
                                                         bool(len(va.y)))
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if not quiet:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(schedule, highlight=False)
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(spec.in_chans, **cfg.encoder_kwargs())
    result = fit_encoder(encoder, (tr.x, tr.y), (va.x, va.y), cfg,
                         log_path=run / "metrics.jsonl", quiet=quiet,
                         checkpoint_dir=run / "checkpoint", resume_from=ckpt)
    if result.history:
        plot_curves(result.history, run / "curves.png", result.best_epoch)
    gallery, gcfg, val_metrics, rule = _threshold(encoder, ds.classes, tr, va, cfg)
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "train_count": len(tr.y),
                               "epochs_run": len(result.history),
                               "stopped_early": result.stopped_early, **val_metrics}
    (run / "run.json").write_text(json.dumps(
        {"schedule": schedule, "episodes": cfg.episodes, "patience": cfg.patience,
         "epochs": cfg.epochs, "epochs_run": len(result.history),
         "best_epoch": result.best_epoch, "stopped_early": result.stopped_early}, indent=2))
    manifest = new_gallery_manifest(
        encoder_kwargs=cfg.encoder_kwargs(), in_chans=spec.in_chans, preprocess=spec.to_dict(),
        gallery=gallery, config=gcfg, metrics=metrics,
        training={"config": cfg.to_dict(), "counts": ds.counts(), "data": str(data),
                  "kind": "fewshot", "threshold_rule": rule, "schedule": schedule}
    ).with_changes(scale_fit=metrics["scale_fit"])
    check = np.asarray((va.x if len(va.y) else tr.x)[:16], dtype=np.float32)
    bundle = save_gallery_bundle(run / "bundle", manifest, encoder.state_dict(), gallery,
                                 x_check=check)  # the encoder's graph, checked on val crops
    seconds = time.perf_counter() - t0
    from imgtriage.train.fewshot_pretrained import left_out

    line = (f"similarity threshold {gcfg.similarity_threshold} ({rule}); "
            f"{metrics['scale_fit']['line']}{left_out(ds.classes, gallery.classes)}")
    if not quiet:
        from rich.console import Console

        shown = {k: v for k, v in metrics.items() if k != "scale_fit"}  # in the line
        Console(stderr=True).print(f"best epoch {result.best_epoch}: {shown} | {line} | "
                                   f"bundle: {bundle} | {seconds:.1f}s")
    return TrainResult(run, bundle, metrics, seconds, line)
