"""A few-shot gallery on the pretrained encoder: a folder of photos enrolled, no training.

``train_fewshot(data, out, FewShotConfig(encoder="pretrained"))`` (``imgtriage
train-fewshot DATA --encoder pretrained``, and ``--encoder auto`` for colour photos when the
ImageNet weights are installed, see :func:`choose_encoder`) writes the same run directory and
the same kind of bundle as episodic training, without an epoch: every image (the train and
val splits: nothing is needed to pick an epoch) goes once through the installed backbone
(:func:`imgtriage.predict.gallery_embed.pretrained_encoder`, the bundle's own ONNX graph,
the weights' normalisation), and the similarity threshold (``--keep-rate``) and the logit
scale (:mod:`imgtriage.predict.gallery_scale`, unless ``--scale`` is given) are fitted on the
enrolled images held out in turn. Classes are then added or removed with ``imgtriage
gallery add/remove`` as for any gallery.

Example:
    >>> from imgtriage.train.fewshot import FewShotConfig, train_fewshot
    >>> cfg = FewShotConfig(encoder="pretrained")
    >>> res = train_fewshot("photos/", "runs/g", cfg)  # doctest: +SKIP
    >>> res.rule  # doctest: +SKIP
    'similarity threshold 0.61 (keep 95% of the enrolled images answered correctly ...)'
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.data.discovery import Dataset, Sample
from imgtriage.errors import DataError
from imgtriage.models.pretrained import EXTRA_LINE, get_weights
from imgtriage.train.fewshot_config import PRETRAINED_BACKBONE, FewShotConfig
from imgtriage.train.run import TrainResult

__all__ = ["choose_encoder", "enrol_pretrained"]

# Why --encoder auto picks the pretrained encoder for colour photos (docs/benchmarks.md,
# "Gallery with the pretrained encoder").
WHY_PRETRAINED = ("colour photos and the ImageNet weights installed: enrolling them through "
                  "the pretrained {b} needs no training and beats an encoder trained on a few "
                  "photos (CIFAR-10, 5 photos per class: 56% against 20%, docs/benchmarks.md)")
WHY_EPISODIC = ("{c}-channel images: an encoder trained on them (on grey SAR chips one "
                "trained on other classes beat the pretrained one on new classes, 5-shot 70% "
                "against 66%, docs/benchmarks.md; --encoder pretrained to use it anyway)")


def choose_encoder(cfg: FewShotConfig, in_chans: int) -> tuple[str | None, str]:
    """``(pretrained backbone or None for episodic training, why)`` for ``--encoder``.

    Example:
        >>> choose_encoder(FewShotConfig(encoder="episodic"), 3)
        (None, 'episodic: --encoder episodic')
        >>> choose_encoder(FewShotConfig(), 1)[0] is None
        True
    """
    if cfg.encoder == "episodic":
        return None, "episodic: --encoder episodic"
    backbone = cfg.backbone()
    if backbone is not None:
        return backbone, f"pretrained {backbone}: --encoder {cfg.encoder}"
    if in_chans != 3:
        return None, "episodic: " + WHY_EPISODIC.format(c=in_chans)
    entry = get_weights(PRETRAINED_BACKBONE)
    if entry is None or entry.path() is None:
        return None, (f"episodic: colour photos, but the pretrained weights are not installed "
                      f"(`{EXTRA_LINE}` enrols photos without training)")
    return PRETRAINED_BACKBONE, (f"pretrained {PRETRAINED_BACKBONE}: "
                                 + WHY_PRETRAINED.format(b=PRETRAINED_BACKBONE))


def _graph_manifest(backbone: str, kwargs: dict[str, Any], spec: Any, classes: Sequence[str],
                    gallery: Any = None, **extra: Any) -> Any:
    """The gallery manifest (a provisional one, for the graph's metadata, without
    ``gallery``)."""
    from imgtriage.bundle import new_manifest
    from imgtriage.evaluate.decision import DecisionPolicy
    from imgtriage.predict.gallery import new_gallery_manifest

    if gallery is not None:
        return new_gallery_manifest(encoder=backbone, encoder_kwargs=kwargs, in_chans=3,
                                    preprocess=spec.to_dict(), gallery=gallery, **extra)
    return new_manifest(model_name=backbone, model_kwargs=kwargs, in_chans=3,
                        preprocess=spec.to_dict(), classes=list(classes),
                        decision=DecisionPolicy().to_dict(), kind="gallery")


def _check_inputs(samples: Sequence[Sample], spec: Any, n: int = 8) -> np.ndarray | None:
    """A few real model inputs to check the exported graph against torch."""
    from imgtriage.data.preprocess import load_input
    from imgtriage.errors import ImageReadError

    xs = []
    for s in samples[:4 * n]:
        try:
            xs.append(load_input(s.path, spec)[0])
        except ImageReadError:
            continue
        if len(xs) == n:
            break
    return np.stack(xs) if xs else None


def enrol_pretrained(data: Any, run: Path, cfg: FewShotConfig, ds: Dataset, backbone: str,
                     why: str, *, quiet: bool = False, t0: float | None = None
                     ) -> TrainResult:
    """Enrol the train and val splits of ``ds`` through the pretrained ``backbone``, fit the
    similarity threshold left-one-out, save ``run/bundle`` (see the module docstring)."""
    from imgtriage.data import samples_by_split
    from imgtriage.models.gallery import Gallery, GalleryConfig, fit_similarity_threshold
    from imgtriage.predict.gallery import encoder_graph, save_gallery_bundle
    from imgtriage.predict.gallery_embed import embed_paths, encoder_runner, pretrained_encoder
    from imgtriage.predict.gallery_scale import given_or_held_out

    t0 = time.perf_counter() if t0 is None else t0
    parts = samples_by_split(ds)
    samples = [*parts.get("train", []), *parts.get("val", [])]
    encoder, spec, plan, kwargs = pretrained_encoder(backbone, cfg.img_size,
                                                     scaling=cfg.scaling)
    cfg = replace(cfg, encoder=backbone, in_chans=3, img_size=spec.size[0])
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    _say(f"encoder: {why}; {plan.note}; {len(samples)} images at {spec.size[0]} px, no "
         "training", quiet)
    graph = encoder_graph(encoder, _graph_manifest(backbone, kwargs, spec, ds.classes),
                          _check_inputs(samples, spec))
    run_embed = encoder_runner(encoder, graph[0].get(graph[1].get("file") or ""),
                               cfg.num_threads)
    emb, kept, defects = embed_paths(run_embed, [s.path for s in samples], spec,
                                     workers=cfg.decode_workers, progress=not quiet,
                                     label=f"{len(samples)} images")
    found = ds.found_rows()
    (run / "defects.json").write_text(json.dumps([d.to_dict() for d in defects] + found,
                                                 indent=2))
    labels = [samples[i].label for i in kept]
    if len(set(labels)) < 2:
        raise DataError("a gallery needs readable images of at least 2 classes; see "
                        f"{run / 'defects.json'}")
    gallery = Gallery.build(emb, labels, [samples[i].path for i in kept],
                            [c for c in ds.classes if c in set(labels)])
    gcfg = GalleryConfig(method=cfg.method, k=cfg.knn_k, scale=cfg.start_scale())
    threshold, fit = fit_similarity_threshold(gallery, gcfg, cfg.keep_rate)
    gcfg, scale_fit = given_or_held_out(gallery, gcfg, cfg.scale is not None)
    gcfg = replace(gcfg, similarity_threshold=threshold)
    rule = (f"keep {cfg.keep_rate:.0%} of the enrolled images answered correctly left-one-out"
            + (f" ({fit['correction']})" if fit["correction"] else ""))
    metrics = {"train_count": len(kept), "epochs_run": 0, "threshold_fit": fit,
               "scale_fit": scale_fit}
    manifest = _graph_manifest(
        backbone, kwargs, spec, gallery.classes, gallery, config=gcfg, metrics=metrics,
        training={"config": cfg.to_dict(), "counts": ds.counts(), "data": str(data),
                  "kind": "fewshot", "encoder": "pretrained", "encoder_choice": why,
                  "pretrained": plan.to_dict(), "threshold_rule": rule})
    if list(gallery.classes) != list(ds.classes):  # a class lost every file: its metadata
        graph = encoder_graph(encoder, manifest, _check_inputs(samples, spec))
    bundle = save_gallery_bundle(run / "bundle", manifest.with_changes(
        threshold_fit=fit, scale_fit=scale_fit), encoder.state_dict(), gallery, graph=graph)
    line = (f"similarity threshold {threshold} ({rule}); {scale_fit['line']}"
            f"{left_out(ds.classes, gallery.classes)}")
    seconds = time.perf_counter() - t0
    _say(f"enrolled {len(kept)} images of {len(gallery.classes)} classes | {line} | bundle: "
         f"{bundle} | {seconds:.1f}s", quiet)
    return TrainResult(run, Path(bundle), metrics, seconds, line)


def left_out(classes: Sequence[str], enrolled: Sequence[str]) -> str:
    """'' or a clause naming the classes none of whose files could be read: the gallery has
    no entry for them, which the output must say."""
    lost = [c for c in classes if c not in set(enrolled)]
    if not lost:
        return ""
    return (f"; left out of the gallery: {', '.join(map(repr, lost))} (none of their files "
            "could be read, see defects.json; `imgtriage gallery add BUNDLE --label NAME "
            "FILES` enrols readable ones later)")


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(msg, highlight=False)
