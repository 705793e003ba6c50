"""The gallery kind: a few-shot gallery stored in a bundle, and its predictor.

A gallery bundle (manifest ``kind: "gallery"``) holds an embedding net
(``weights.safetensors``: a trained Siamese encoder, or a pretrained backbone's pooled
features; the manifest's ``model`` block names which, see
:mod:`imgtriage.models.gallery_encoder`), the enrolled embeddings
(``gallery.safetensors``, tensor ``embeddings`` (M, D)) and, in the manifest's ``gallery``
block, one label and one id per row plus the scoring rule (:class:`GalleryConfig`). The math
lives in :mod:`imgtriage.models.gallery`; classes and examples are enrolled or removed without
retraining by :mod:`imgtriage.predict.gallery_edit`, each edit writing a new bundle version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, Manifest, new_manifest, save_bundle
from imgtriage.errors import BundleError, BundleSchemaError, ConfigError
from imgtriage.evaluate.decision import DecisionPolicy
from imgtriage.models.gallery import Gallery, GalleryConfig, embed
from imgtriage.predict.backends import RuntimeChoice
from imgtriage.predict.base import PredictOptions, decision_rows
from imgtriage.predict.predictor import TTA_TRANSFORMS, Predictor

__all__ = ["GALLERY_FILE", "Gallery", "GalleryBackend", "GalleryConfig", "GalleryPredictor",
           "embed", "encoder_graph", "gallery_block", "gallery_files", "load_encoder",
           "load_gallery_predictor", "new_gallery_manifest", "read_gallery",
           "save_gallery_bundle"]

GALLERY_FILE = "gallery.safetensors"


# -- bundle storage ---------------------------------------------------------------------------
def gallery_block(gallery: Gallery, config: GalleryConfig) -> dict[str, Any]:
    """The manifest's ``gallery`` block: rule, labels and ids (embeddings go to safetensors)."""
    return {**config.to_dict(), "embed_dim": gallery.dim, "labels": list(gallery.labels),
            "ids": list(gallery.ids)}


def gallery_files(gallery: Gallery) -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    return {GALLERY_FILE: save({"embeddings": torch.from_numpy(gallery.embeddings.copy())})}


def read_gallery(bundle: Bundle) -> tuple[Gallery, GalleryConfig]:
    """The verified gallery and its scoring rule from a loaded gallery bundle."""
    block = bundle.info.block("gallery")
    if not isinstance(block, dict) or "labels" not in block:
        raise BundleSchemaError(f"{bundle.path}: a gallery bundle needs a 'gallery' block "
                                "with labels and ids in its manifest")
    tensors = bundle.tensors(GALLERY_FILE)
    emb = tensors["embeddings"].numpy().astype(np.float32)
    gallery = Gallery(emb, tuple(block["labels"]), tuple(block["ids"]),
                      bundle.info.classes)
    return gallery, GalleryConfig.from_dict(block)


def load_encoder(bundle: Bundle):
    """The bundle's embedding net (the encoder its ``model`` block names) with its verified
    weights, in eval mode."""
    from imgtriage.models.gallery_encoder import build_gallery_encoder
    from imgtriage.predict.backends import check_shapes

    m = bundle.info.model
    state = bundle.state_dict()

    def build() -> Any:
        return build_gallery_encoder(m.name, m.in_chans, dict(m.kwargs))

    check_shapes(bundle, state, build)
    encoder = build()
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.path}: weights do not fit the {m.name} encoder: "
                          f"{str(exc).splitlines()[0]}") from exc
    return encoder.eval()


def new_gallery_manifest(*, encoder_kwargs: dict[str, Any], in_chans: int,
                         preprocess: dict[str, Any], gallery: Gallery, config: GalleryConfig,
                         training: dict[str, Any] | None = None,
                         metrics: dict[str, Any] | None = None,
                         encoder: str = "siamese") -> Manifest:
    """A version-1 manifest of kind ``gallery`` for an encoder (``siamese`` or a pretrained
    backbone's name) and its gallery."""

    manifest = new_manifest(model_name=encoder, model_kwargs=encoder_kwargs,
                            in_chans=in_chans, preprocess=preprocess,
                            classes=list(gallery.classes), training=training, metrics=metrics,
                            decision=DecisionPolicy().to_dict(), kind="gallery")
    return manifest.with_changes(gallery=gallery_block(gallery, config))


def save_gallery_bundle(path: str | os.PathLike[str], manifest: Manifest,
                        encoder_state: dict[str, Any], gallery: Gallery,
                        x_check: np.ndarray | None = None,
                        graph: tuple[dict[str, bytes], dict[str, Any]] | None = None) -> Any:
    """Write a gallery bundle (encoder weights + gallery tensors + manifest) with the
    encoder's verified ONNX graph (output ``embedding``, checked against torch on ``x_check``
    or random inputs); an encoder that does not export keeps torch, the manifest says why.
    ``graph``: ``(files, onnx block)`` of :func:`encoder_graph` already made for this
    encoder and manifest (not exported again)."""
    if graph is None:
        from imgtriage.models.gallery_encoder import build_gallery_encoder

        m = manifest.model
        encoder = build_gallery_encoder(m.name, m.in_chans, dict(m.kwargs))
        encoder.load_state_dict({k: v.detach().cpu() for k, v in encoder_state.items()})
        graph = encoder_graph(encoder, manifest, x_check)
    files, onnx = graph
    return save_bundle(path, manifest.with_changes(onnx=onnx), encoder_state,
                       {**gallery_files(gallery), **files})


def encoder_graph(encoder: Any, manifest: Manifest, x_check: np.ndarray | None = None
                  ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``(files, onnx block)``: the encoder's verified ONNX graph (output ``embedding``) for a
    gallery bundle with ``manifest``'s preprocessing, or no file and the reason."""
    from imgtriage.predict.graph import training_graph

    return training_graph(encoder.eval(), manifest, x_check, outputs=("embedding",))


# -- prediction -------------------------------------------------------------------------------
class GalleryBackend:
    """``(N, C, h, w) -> (N, K)`` logits (``scale`` x similarity) of a gallery bundle.

    ``embed`` and ``similarities`` expose the steps; everything runs in inference mode.
    """

    name = "torch-gallery"

    def __init__(self, bundle: Bundle, device: str = "cpu", backend: str = "auto") -> None:
        self.gallery, self.config = read_gallery(bundle)
        info = bundle.info.block("onnx") or {}
        self._session = None
        if backend != "torch" and device == "cpu" and info.get("output") == "embedding" \
                and bundle.has_file(info.get("file") or ""):
            from imgtriage.predict.ort_session import (
                open_session,
                session_options,
                usable_cores,
            )

            self.threads = usable_cores()
            self._session = open_session(bundle.verified_bytes(info["file"]),
                                         session_options(self.threads))
            self.name = "onnx-gallery"
            return
        if backend == "onnx":
            raise ConfigError(f"{bundle.path} has no ONNX graph of its encoder "
                              f"({info.get('reason') or 'saved before encoders were exported'})"
                              "; use --backend torch (or auto)")
        import torch

        self.device = torch.device(device)
        self.threads = torch.get_num_threads()
        self.encoder = load_encoder(bundle).to(self.device)

    def embed(self, x: np.ndarray) -> np.ndarray:
        if self._session is not None:
            return self._session.run(["embedding"], {"input": np.ascontiguousarray(
                x, dtype=np.float32)})[0]
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

    def __init__(self, bundle: Bundle, backend: GalleryBackend) -> None:
        note = "the encoder's verified graph" if backend.name.startswith("onnx") else (
            "no ONNX graph of the encoder: "
            + ((bundle.info.block("onnx") or {}).get("reason") or "saved before encoders were "
               "exported"))
        super().__init__(bundle, backend, RuntimeChoice(backend.name, "fp32", backend.threads,
                                                        note))
        self.gallery: Gallery = backend.gallery
        self.config: GalleryConfig = backend.config

    def similarities(self, x: np.ndarray, tta: bool = False) -> np.ndarray:
        """(N, K) similarities; with ``tta`` the embedding is averaged over the bundle's views."""
        if not tta:
            return self.backend.similarities(x)
        views = [x, *(np.ascontiguousarray(TTA_TRANSFORMS[t](x)) for t in self.tta_transforms)]
        emb = np.mean([self.backend.embed(v) for v in views], axis=0)
        return self.gallery.similarities(emb, self.config.method, self.config.k)

    def logits(self, x: np.ndarray, tta: bool = False, features: np.ndarray | None = None
               ) -> np.ndarray:
        return self.similarities(x, tta) * np.float32(self.config.scale)

    def rows_for_inputs(self, x: np.ndarray, names: Sequence[str], opts: PredictOptions,
                        metas: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Result rows for preprocessed inputs: the decision policy on ``scale * similarity``
        logits, plus abstention when the best similarity is below the threshold."""
        if len(x) == 0:
            return []
        sims = self.similarities(x, opts.tta)
        policy = self.policy_for(opts)
        d = policy.decide(sims * np.float32(self.config.scale))
        best = sims[np.arange(len(sims)), d.class_id]
        thr = self.config.similarity_threshold
        low = best < thr if thr is not None else np.zeros(len(best), bool)
        # far from every gallery example (or a constant image): nothing like it was enrolled
        far = low | np.array([bool(m.get("degenerate")) for m in metas or [{}] * len(best)])
        reason = [("out_of_distribution" if f else r) for f, r in zip(far, d.reason,
                                                                       strict=True)]
        d = replace(d, abstained=d.abstained | far, reason=reason)
        return decision_rows(names, self.classes, d, policy, opts, metas,
                             abstained=d.abstained,
                             extras=[{"similarity": round(float(b), 6)} for b in best],
                             topk_extra={"similarity": sims})

    def gallery_summary(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "embed_dim": self.gallery.dim,
                "encoder": self.bundle.info.model.name, "counts": self.gallery.counts()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kind": "gallery", "gallery": self.gallery_summary()}

    def report_extra(self, results: list[dict[str, Any]], opts: PredictOptions
                     ) -> dict[str, Any]:
        return {**super().report_extra(results, opts), "kind": "gallery", "gallery": {
            "method": self.config.method, "k": self.config.k, "scale": self.config.scale,
            "similarity_threshold": self.config.similarity_threshold}}


def load_gallery_predictor(bundle: Bundle, backend: str = "auto", device: str = "cpu",
                           **_: Any) -> GalleryPredictor:
    """Loader for ``kind: "gallery"`` bundles (``Predictor.load`` calls it)."""
    if backend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"backend must be auto, torch or onnx, got {backend!r} (--backend)")
    return GalleryPredictor(bundle, GalleryBackend(bundle, device, backend))
