"""Few-shot galleries: classes as enrolled embeddings, scored in one matrix multiply.

A gallery bundle (manifest ``kind: "gallery"``) holds an embedding net
(``weights.safetensors``, see :mod:`imgtriage.models.siamese`), the enrolled embeddings
(``gallery.safetensors``, tensor ``embeddings`` (M, D)) and, in the manifest's ``gallery``
block, one label and one id per row plus the scoring rule: ``prototype`` (cosine similarity
to each class's mean embedding) or ``knn`` (mean of the k highest similarities per class),
a ``scale`` turning similarities into logits, and the ``similarity_threshold`` below which
the answer is ``unknown``. Classes and examples are enrolled or removed without retraining
(:func:`enrol_images`, :func:`remove_items`); each edit writes a new bundle version.

Example:
    >>> import numpy as np
    >>> g = Gallery.build(np.eye(3, dtype=np.float32), ["a", "b", "b"], ["x", "y", "z"])
    >>> g.classes, g.counts()
    (('a', 'b'), {'a': 1, 'b': 2})
    >>> np.round(g.similarities(np.eye(3, dtype=np.float32)[:1]), 3).tolist()
    [[1.0, 0.0]]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from imgtriage.errors import BundleSchemaError, ConfigError, DataError

# A gallery bundle predicts through the same public API as a classifier, so its predictor
# subclasses Predictor (this is the one import of predict/ from models/, by design: the
# registered kind loader lives with the gallery it loads).
from imgtriage.predict.predictor import Predictor

GALLERY_FILE = "gallery.safetensors"
METHODS = ("prototype", "knn")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class GalleryConfig:
    """How a gallery turns similarities into an answer; saved in the bundle.

    ``similarity_threshold`` None never abstains; otherwise an input whose best class
    similarity is below it is answered ``unknown``.

    Example:
        >>> GalleryConfig(method="knn", k=3).k
        3
    """

    method: str = "prototype"
    k: int = 1
    scale: float = 10.0
    similarity_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"gallery method must be one of {METHODS}, got {self.method!r} "
                              "(--method)")
        if int(self.k) < 1:
            raise ConfigError(f"k must be >= 1, got {self.k} (--knn-k)")
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ConfigError(f"scale must be a positive number, got {self.scale} (--scale)")
        t = self.similarity_threshold
        if t is not None and not -1.0 <= float(t) <= 1.0:
            raise ConfigError(f"similarity threshold must lie in [-1, 1], got {t} "
                              "(--similarity-threshold)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GalleryConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True, eq=False)
class Gallery:
    """Enrolled embeddings (rows L2-normalised), one label and one id per row, and the
    class order (every class has at least one row). Immutable: edits return a new gallery."""

    embeddings: np.ndarray
    labels: tuple[str, ...]
    ids: tuple[str, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        e = self.embeddings
        if e.ndim != 2 or len(e) != len(self.labels) or len(e) != len(self.ids):
            raise DataError(f"gallery needs (M, D) embeddings with M labels and ids; got "
                            f"{e.shape}, {len(self.labels)} labels, {len(self.ids)} ids")
        present = set(self.labels)
        if present != set(self.classes) or len(set(self.classes)) != len(self.classes):
            raise DataError(f"gallery classes {list(self.classes)} do not match the labels "
                            f"of its items {sorted(present)}")
        index = {c: i for i, c in enumerate(self.classes)}
        object.__setattr__(self, "_label_ids", np.array([index[x] for x in self.labels],
                                                        dtype=np.int64))
        object.__setattr__(self, "_prototypes", self._compute_prototypes())

    @classmethod
    def build(cls, embeddings: np.ndarray, labels: Sequence[str], ids: Sequence[str],
              classes: Sequence[str] | None = None) -> Gallery:
        """A gallery from rows (normalised here); ``classes`` defaults to first appearance."""
        labels = tuple(str(x) for x in labels)
        order = tuple(classes) if classes is not None else tuple(dict.fromkeys(labels))
        return cls(l2_normalise(embeddings), labels, tuple(str(i) for i in ids), order)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def counts(self) -> dict[str, int]:
        n = np.bincount(self._label_ids, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n, strict=True)}

    def _compute_prototypes(self) -> np.ndarray:
        # One class at a time (not per item): each prototype depends on its own class's
        # rows only, so enrolling or removing another class leaves it bit-for-bit unchanged.
        protos = [self.embeddings[self._label_ids == i].mean(axis=0)
                  for i in range(len(self.classes))]
        return l2_normalise(np.stack(protos)) if protos else np.zeros((0, self.dim), np.float32)

    @property
    def prototypes(self) -> np.ndarray:
        """(K, D) unit-length class means, in ``classes`` order."""
        return self._prototypes

    def similarities(self, queries: np.ndarray, method: str = "prototype", k: int = 1
                     ) -> np.ndarray:
        """(N, K) cosine similarity of each query to each class, vectorised over the gallery.

        ``prototype``: one (N, D) x (D, K) product. ``knn``: one (N, D) x (D, M) product, then
        the mean of each class's top-``k`` similarities (fewer when a class has fewer rows),
        gathered through a padded (K, max_count) index, so there is no loop over items.
        """
        q = l2_normalise(queries)
        if method == "prototype":
            return q @ self.prototypes.T
        if method != "knn":
            raise ConfigError(f"gallery method must be one of {METHODS} (--method)")
        sims = q @ self.embeddings.T  # (N, M)
        index, valid = self._padded_index()
        padded = np.where(valid[None], sims[:, index], -np.inf)  # (N, K, max_count)
        kk = min(int(k), index.shape[1])
        top = -np.partition(-padded, kk - 1, axis=2)[:, :, :kk] if kk < index.shape[1] \
            else padded
        top = np.where(np.isfinite(top), top, 0.0)
        n = np.minimum(valid.sum(axis=1), int(k)).astype(np.float32)
        return (top.sum(axis=2) / n[None]).astype(np.float32)

    def _padded_index(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self._label_ids, kind="stable")
        counts = np.bincount(self._label_ids, minlength=len(self.classes))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        width = int(counts.max())
        pos = np.arange(width)[None]
        valid = pos < counts[:, None]
        index = order[np.where(valid, starts[:, None] + pos, 0)]
        return index, valid

    def add(self, label: str, embeddings: np.ndarray, ids: Sequence[str]) -> Gallery:
        """A gallery with rows added to ``label`` (a new class goes last in the order)."""
        ids = tuple(str(i) for i in ids)
        if len(ids) != len(embeddings) or not ids:
            raise DataError(f"enrol needs one id per embedding, got {len(ids)} ids for "
                            f"{len(embeddings)} embeddings")
        taken = {i for i, lab in zip(self.ids, self.labels, strict=True) if lab == label}
        dup = sorted(taken.intersection(ids) | {i for i in ids if ids.count(i) > 1})
        if dup:
            raise DataError(f"class {label!r} already holds {dup[:5]}; remove them first "
                            "(`imgtriage gallery remove ... --images`) or enrol other files")
        classes = self.classes if label in self.classes else (*self.classes, label)
        return Gallery(np.concatenate([self.embeddings, l2_normalise(embeddings)]),
                       (*self.labels, *([label] * len(ids))), (*self.ids, *ids), classes)

    def remove(self, label: str, ids: Sequence[str] | None = None) -> Gallery:
        """A gallery without class ``label`` (or only without the rows named in ``ids``,
        matched by id or by file name); a class left without rows disappears."""
        if label not in self.classes:
            raise DataError(f"class {label!r} is not in the gallery; it has "
                            f"{list(self.classes)} (`imgtriage gallery list`)")
        mine = np.array([lab == label for lab in self.labels])
        if ids is None:
            drop = mine
        else:
            wanted = {str(i) for i in ids}
            hit = np.array([i in wanted or os.path.basename(i) in wanted for i in self.ids])
            drop = mine & hit
            matched = {i for i, h in zip(self.ids, drop, strict=True) if h}
            missing = sorted(w for w in wanted if w not in matched
                             and w not in {os.path.basename(m) for m in matched})
            if missing:
                raise DataError(f"class {label!r} holds no items {missing[:5]}; see "
                                "`imgtriage gallery list --items`")
        keep = ~drop
        if not keep.any():
            raise DataError("a gallery needs at least one class; removing this would empty it")
        labels = tuple(lab for lab, k in zip(self.labels, keep, strict=True) if k)
        classes = tuple(c for c in self.classes if c in set(labels))
        return Gallery(self.embeddings[keep], labels,
                       tuple(i for i, k in zip(self.ids, keep, strict=True) if k), classes)


# -- bundle storage ---------------------------------------------------------------------------
def gallery_block(gallery: Gallery, config: GalleryConfig) -> dict[str, Any]:
    """The manifest's ``gallery`` block: rule, labels and ids (embeddings go to safetensors)."""
    return {**config.to_dict(), "embed_dim": gallery.dim, "labels": list(gallery.labels),
            "ids": list(gallery.ids)}


def gallery_files(gallery: Gallery) -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    return {GALLERY_FILE: save({"embeddings": torch.from_numpy(gallery.embeddings.copy())})}


def read_gallery(bundle: Any) -> tuple[Gallery, GalleryConfig]:
    """The verified gallery and its scoring rule from a loaded gallery bundle."""
    from safetensors.torch import load

    block = bundle.manifest.get("gallery")
    if not isinstance(block, dict) or "labels" not in block:
        raise BundleSchemaError(f"{bundle.path}: a gallery bundle needs a 'gallery' block "
                                "with labels and ids in its manifest")
    tensors = load(bundle.verified_bytes(GALLERY_FILE))
    emb = tensors["embeddings"].numpy().astype(np.float32)
    gallery = Gallery(emb, tuple(block["labels"]), tuple(block["ids"]),
                      tuple(bundle.manifest["classes"]))
    return gallery, GalleryConfig.from_dict(block)


def load_encoder(bundle: Any):
    """The bundle's embedding net with its verified weights, in eval mode."""
    from imgtriage.errors import BundleError
    from imgtriage.models.siamese import build_encoder

    m = bundle.manifest["model"]
    encoder = build_encoder(int(m["in_chans"]), **dict(m.get("kwargs") or {}))
    try:
        encoder.load_state_dict(bundle.state_dict(), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.path}: weights do not fit the siamese encoder: "
                          f"{str(exc).splitlines()[0]}") from exc
    return encoder.eval()


def embed(encoder: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, C, h, w) model inputs -> (N, D) unit-length embeddings, batch by batch."""
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))
            outs.append(encoder(xb).float().numpy())
    dim = int(getattr(encoder, "num_features", 0))
    return np.concatenate(outs) if outs else np.zeros((0, dim), np.float32)


def new_gallery_manifest(*, encoder_kwargs: dict[str, Any], in_chans: int,
                         preprocess: dict[str, Any], gallery: Gallery, config: GalleryConfig,
                         training: dict[str, Any] | None = None,
                         metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A version-1 manifest of kind ``gallery`` for an encoder and its gallery."""
    from imgtriage.bundle import new_manifest

    manifest = new_manifest(model_name="siamese", model_kwargs=encoder_kwargs,
                            in_chans=in_chans, preprocess=preprocess,
                            classes=list(gallery.classes), training=training, metrics=metrics,
                            kind="gallery")
    manifest["gallery"] = gallery_block(gallery, config)
    return manifest


def save_gallery_bundle(path: str | os.PathLike[str], manifest: dict[str, Any],
                        encoder_state: dict[str, Any], gallery: Gallery) -> Any:
    """Write a gallery bundle (encoder weights + gallery tensors + manifest)."""
    from imgtriage.bundle import save_bundle

    return save_bundle(path, manifest, encoder_state, gallery_files(gallery))


# -- prediction -------------------------------------------------------------------------------
class GalleryBackend:
    """``(N, C, h, w) -> (N, K)`` logits (``scale`` x similarity) of a gallery bundle.

    ``embed`` and ``similarities`` expose the steps; everything runs in inference mode.
    """

    name = "torch-gallery"

    def __init__(self, bundle: Any, device: str = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.encoder = load_encoder(bundle).to(self.device)
        self.gallery, self.config = read_gallery(bundle)

    def embed(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            return self.encoder(xt).float().cpu().numpy()

    def similarities(self, x: np.ndarray) -> np.ndarray:
        return self.gallery.similarities(self.embed(x), self.config.method, self.config.k)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.similarities(x) * np.float32(self.config.scale)


class GalleryPredictor(Predictor):
    """A :class:`~imgtriage.predict.Predictor` over a gallery bundle: same public methods
    (``load``, ``predict_paths``, ``predict_arrays``, ``predict_bytes``, ``rows_for_inputs``,
    ``make_report``, ``describe`` ...), so ``imgtriage predict``, the service and Ray take
    gallery bundles like any other. Rows add ``similarity`` (cosine similarity to the chosen
    class); an input below the bundle's ``similarity_threshold`` is answered ``unknown``.

    Example:
        >>> p = Predictor.load("runs/fewshot/bundle")  # doctest: +SKIP
        >>> p.predict_paths(["crops/"])["results"][0]["similarity"]  # doctest: +SKIP
        0.83
    """

    def __init__(self, bundle: Any, backend: GalleryBackend) -> None:
        super().__init__(bundle, backend)
        self.gallery: Gallery = backend.gallery
        self.config: GalleryConfig = backend.config

    def similarities(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        """(N, K) similarities; with ``tta`` the embedding is averaged over the bundle's views."""
        from imgtriage.predict.predictor import TTA_TRANSFORMS

        if not tta:
            return self.backend.similarities(x)
        views = [x, *(np.ascontiguousarray(TTA_TRANSFORMS[t](x)) for t in self.tta_transforms)]
        emb = np.mean([self.backend.embed(v) for v in views], axis=0)
        return self.gallery.similarities(emb, self.config.method, self.config.k)

    def logits(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.similarities(x, tta) * np.float32(self.config.scale)

    def rows_for_inputs(self, x: np.ndarray, names: Sequence[str], opts: Any,
                        metas: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Result rows for preprocessed inputs: the decision policy on ``scale * similarity``
        logits, plus abstention when the best similarity is below the threshold."""
        from imgtriage.predict.report import result_row

        if len(x) == 0:
            return []
        sims = self.similarities(x, opts.tta)
        policy = self.policy_for(opts)
        d = policy.decide(sims * np.float32(self.config.scale))
        best = sims[np.arange(len(sims)), d.class_id]
        thr = self.config.similarity_threshold
        low = best < thr if thr is not None else np.zeros(len(best), bool)
        rows = []
        for i, name in enumerate(names):
            cid = int(d.class_id[i])
            abstained = bool(d.abstained[i] or low[i])
            probs = ({c: round(float(p), 6) for c, p in zip(self.classes, d.probs[i],
                                                             strict=True)}
                     if opts.include_probs else None)
            topk = None
            if opts.topk:
                order = np.argsort(-d.probs[i])[: opts.topk]
                topk = [{"class": self.classes[j], "class_id": int(j),
                         "score": round(float(d.probs[i, j]), 6),
                         "similarity": round(float(sims[i, j]), 6)} for j in order]
            pred_set = [self.classes[j] for j in d.sets[i]] if d.sets is not None else None
            flags = ["degenerate"] if metas and metas[i].get("degenerate") else None
            rows.append(result_row(name, policy.unknown_label if abstained else self.classes[cid],
                                   cid, d.score[i], abstained, probs=probs, topk=topk,
                                   pred_set=pred_set, flags=flags,
                                   extra={"similarity": round(float(best[i]), 6)},
                                   best_class=self.classes[cid]))
        return rows

    def gallery_summary(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "embed_dim": self.gallery.dim,
                "counts": self.gallery.counts()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": "gallery", "gallery": self.gallery_summary()}

    def make_report(self, results: list[dict[str, Any]], defects: list[dict[str, Any]],
                    elapsed: float, batch_size: int, opts: Any) -> dict[str, Any]:
        report = super().make_report(results, defects, elapsed, batch_size, opts)
        report["meta"].update(kind="gallery", gallery={
            "method": self.config.method, "k": self.config.k,
            "similarity_threshold": self.config.similarity_threshold})
        return report


def _register() -> None:
    from imgtriage.predict.kinds import register_kind

    @register_kind("gallery")
    def load_gallery_predictor(bundle: Any, backend: str = "auto", device: str = "cpu",
                               **_: Any) -> GalleryPredictor:
        if backend not in ("auto", "torch"):
            raise ConfigError(f"gallery bundles run on the torch backend; got {backend!r} "
                              "(--backend auto|torch)")
        return GalleryPredictor(bundle, GalleryBackend(bundle, device))


_register()
