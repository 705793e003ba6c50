"""Edit a gallery bundle without retraining: enrol, remove, re-threshold, list, create.

Every edit writes a new bundle version through :func:`imgtriage.bundle.update_bundle`, so the
previous manifest stays inside the bundle (``history/manifest.v<N>.json``). An edit that
changes the class list also drops decision rules that were fitted per class (thresholds,
conformal sets, profiles): they no longer line up with the classes, and the history note
says so.

Example:
    >>> b = enrol_images("runs/fs/bundle", "T72", ["t72_a.png", "t72_b.png"])  # doctest: +SKIP
    >>> b.info.bundle_version, b.classes[-1]  # doctest: +SKIP
    (2, 'T72')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, load_bundle, update_bundle
from imgtriage.errors import BundleSchemaError, ConfigError, DataError
from imgtriage.models.gallery import Gallery, GalleryConfig, fit_similarity_threshold
from imgtriage.predict.gallery import (
    GalleryBackend,
    gallery_block,
    gallery_files,
    new_gallery_manifest,
    read_gallery,
    save_gallery_bundle,
)
from imgtriage.predict.gallery_edit_config import GalleryCreateConfig, GalleryRuleChange

PathLike = str | os.PathLike[str]


def open_gallery(path: PathLike | Bundle) -> tuple[Bundle, Gallery, GalleryConfig]:
    """Load a bundle and check that it is of kind ``gallery``."""
    bundle = path if isinstance(path, Bundle) else load_bundle(path)
    if bundle.info.kind != "gallery":
        raise BundleSchemaError(f"{bundle.path} is a {bundle.info.kind}"
                                " bundle, not a gallery; create one with `imgtriage "
                                "train-fewshot` or `imgtriage gallery create`")
    gallery, config = read_gallery(bundle)
    return bundle, gallery, config


def embed_files(bundle: Bundle, images: Sequence[PathLike], encoder: Any = None,
                workers: int | None = None) -> np.ndarray:
    """Decode files with the bundle's preprocessing and embed them a batch at a time, as
    prediction does (the encoder's ONNX graph when the bundle has one; ``encoder``: a torch
    encoder to use instead). Any unreadable file is a DataError naming every such file
    (nothing is enrolled from a partly unreadable list)."""
    from imgtriage.data.preprocess import PreprocessSpec
    from imgtriage.predict.gallery_embed import embed_paths, encoder_runner

    if not images:
        raise DataError("no images given to enrol")
    spec = PreprocessSpec.from_dict(dict(bundle.info.preprocess))
    run = encoder_runner(encoder) if encoder is not None else GalleryBackend(bundle).embed
    emb, _, defects = embed_paths(run, list(images), spec, workers=workers)
    if defects:
        bad = [f"{d.path}: {d.issue}: {d.message}" for d in defects]
        raise DataError(f"{len(bad)} of {len(images)} images cannot be used; fix or leave them "
                        f"out: {'; '.join(bad[:5])}")
    return emb


def write_version(bundle: Bundle, gallery: Gallery, config: GalleryConfig, note: str,
                  out: PathLike | None = None, extra: dict[str, Any] | None = None) -> Bundle:
    """A new bundle version holding ``gallery`` and ``config`` (history keeps the old one);
    ``extra`` manifest keys are set too."""
    from imgtriage.evaluate.decision import DecisionPolicy

    m = bundle.info
    changes: dict[str, Any] = {"classes": list(gallery.classes),
                               "model": replace(m.model,
                                                num_classes=len(gallery.classes)).to_dict(),
                               "gallery": gallery_block(gallery, config), **(extra or {})}
    if tuple(gallery.classes) != m.classes:
        policy = DecisionPolicy.from_dict(dict(m.decision))
        if policy.thresholds is not None or policy.conformal is not None or m.profiles:
            changes["decision"] = replace(policy, thresholds=None, conformal=None).to_dict()
            changes["profiles"] = {}
            note += " (classes changed: per-class thresholds, conformal sets and profiles "
            note += "dropped; recalibrate)"
    return update_bundle(bundle.path, changes, note=note, extra_files=gallery_files(gallery),
                         out=out)


def enrol_images(path: PathLike, label: str, images: Sequence[PathLike], *,
                 out: PathLike | None = None, workers: int | None = None) -> Bundle:
    """Add ``images`` to class ``label`` (a new class when absent); a new bundle version.

    Example:
        >>> enrol_images("gallery", "BTR60", ["a.jpeg"]).classes  # doctest: +SKIP
    """
    label = str(label).strip()
    if not label:
        raise DataError("the class name is empty (--label)")
    bundle, gallery, config = open_gallery(path)
    emb = embed_files(bundle, images, workers=workers)
    new = gallery.add(label, emb, [str(p) for p in images])
    verb = "added class" if label not in gallery.classes else "enrolled into"
    config, extra, why = _refit(bundle, new, config)
    return write_version(bundle, new, config, f"gallery: {verb} {label!r} "
                                              f"({len(images)} images){why}", out, extra)


def _refit(bundle: Bundle, gallery: Gallery, config: GalleryConfig
           ) -> tuple[GalleryConfig, dict[str, Any] | None, str]:
    """What an edit fits again on the edited gallery: a threshold fitted on the enrolled
    items (at the same acceptance; one set by hand stays as it is), and the logit scale
    unless the user gave it (:func:`_rescale`)."""
    config, extra, why = _rescale(bundle, gallery, config)
    fit = bundle.info.block("threshold_fit")
    if not fit:
        return config, extra, why
    threshold, new_fit = fit_similarity_threshold(gallery, config, float(fit["acceptance"]))
    return (replace(config, similarity_threshold=threshold),
            {**extra, "threshold_fit": new_fit}, f"; threshold refitted: {threshold}{why}")


def _rescale(bundle: Bundle, gallery: Gallery, config: GalleryConfig, force: bool = False
             ) -> tuple[GalleryConfig, dict[str, Any], str]:
    """The scale fitted again on the enrolled items held out in turn
    (:func:`~imgtriage.predict.gallery_scale.held_out_scale`, from the current scale and
    through the bundle's decision temperature), unless the user fixed it (``force``: refit
    even then, ``gallery rule --fit-scale``); the manifest change and the note's words."""
    from imgtriage.evaluate.decision import DecisionPolicy
    from imgtriage.predict.gallery_scale import held_out_scale, scale_is_fixed

    if not force and scale_is_fixed(bundle.info.block("scale_fit"), config.scale):
        return config, {}, ""
    temperature = DecisionPolicy.from_dict(dict(bundle.info.decision)).temperature
    config, rec = held_out_scale(gallery, config, temperature)
    return config, {"scale_fit": rec}, f"; {rec['line']}"


def remove_items(path: PathLike, label: str, images: Sequence[str] | None = None, *,
                 out: PathLike | None = None) -> Bundle:
    """Drop class ``label``, or only its items named in ``images`` (by enrolled path or file
    name); a new bundle version."""
    bundle, gallery, config = open_gallery(path)
    new = gallery.remove(label, list(images) if images else None)
    what = f"{len(gallery) - len(new)} items of {label!r}" if images else f"class {label!r}"
    config, extra, why = _refit(bundle, new, config)
    return write_version(bundle, new, config, f"gallery: removed {what}{why}", out, extra)


def set_rule(path: PathLike, change: GalleryRuleChange | None = None, *,
             out: PathLike | None = None, **fields: Any) -> Bundle:
    """Change the scoring rule (threshold, method, k); a new bundle version.

    ``change`` (``GalleryRuleChange``, what ``imgtriage gallery rule`` builds from its
    options), or its fields as keywords (``k`` is accepted for ``knn_k``).

    Example:
        >>> set_rule("targets.gallery", GalleryRuleChange(method="knn", knn_k=3))  # doctest: +SKIP
    """
    if "k" in fields:
        fields["knn_k"] = fields.pop("k")
    if change is not None and fields:
        raise ConfigError("set_rule takes a GalleryRuleChange or its fields as keywords, not "
                          f"both (got change and {sorted(fields)})")
    from imgtriage.predict.gallery_scale import fixed_scale

    bundle, gallery, config = open_gallery(path)
    change = change or GalleryRuleChange(**fields)
    changes = change.changes()
    new = replace(config, **changes)
    hand = "similarity_threshold" in changes  # set by hand: no longer the fitted one
    extra: dict[str, Any] = {"threshold_fit": None} if hand else {}
    why = ""
    if "scale" in changes:  # given: kept by every later edit
        extra["scale_fit"] = fixed_scale(new.scale, "gallery rule --scale")
    elif change.fit_scale or {"method", "k"} & set(changes):  # other similarities: refit
        new, more, why = _rescale(bundle, gallery, new, force=change.fit_scale)
        extra.update(more)
    return write_version(bundle, gallery, new, f"gallery: rule {config.to_dict()} -> "
                                               f"{new.to_dict()}{why}", out, extra or None)


def fit_threshold(path: PathLike, acceptance: float = 0.95, *,
                  out: PathLike | None = None) -> tuple[Bundle, dict[str, Any]]:
    """Fit the similarity threshold on the enrolled items themselves, each held out in turn
    (:func:`~imgtriage.models.gallery.fit_similarity_threshold`): the threshold keeps
    ``acceptance`` of the held-out items answered correctly; below it the gallery answers
    unknown. A new bundle version; the fit's record is the manifest's ``threshold_fit``.

    Example:
        >>> b, fit = fit_threshold("targets.gallery", acceptance=0.95)  # doctest: +SKIP
        >>> fit["held_out_coverage"]  # doctest: +SKIP
        0.83
    """
    bundle, gallery, config = open_gallery(path)
    threshold, fit = fit_similarity_threshold(gallery, config, acceptance)
    new = replace(config, similarity_threshold=threshold)
    how = f"leave-one-out, {fit['correction']}" if fit["correction"] else "leave-one-out"
    b = write_version(bundle, gallery, new, f"gallery: similarity threshold {threshold} fitted "
                                            f"at acceptance {acceptance} ({how})", out,
                      extra={"threshold_fit": fit})
    return b, fit


def describe_gallery(path: PathLike, items: bool = False) -> dict[str, Any]:
    """Classes with their item counts, the scoring rule and the bundle version (and every
    item's id with ``items``) -- what ``imgtriage gallery list`` prints."""
    bundle, gallery, config = open_gallery(path)
    out: dict[str, Any] = {"bundle": str(bundle.path),
                           "bundle_version": bundle.info.bundle_version,
                           "rule": config.to_dict(), "embed_dim": gallery.dim,
                           "scale_fit": bundle.info.block("scale_fit"),
                           "encoder": bundle.info.model.name, "classes": gallery.counts()}
    if items:
        out["items"] = {c: [i for i, lab in zip(gallery.ids, gallery.labels, strict=True)
                            if lab == c] for c in gallery.classes}
    return out


def encoder_state(bundle: Bundle) -> dict[str, Any]:
    """Encoder weights of a gallery bundle or of a classifier bundle of model ``siamese``."""
    info = bundle.info
    if info.kind == "gallery":
        return bundle.state_dict()
    if info.model.name != "siamese":
        raise BundleSchemaError(f"{bundle.path}: model {info.model.name!r} has no siamese "
                                "encoder; train one with `imgtriage train-fewshot` or "
                                "`imgtriage train --model siamese`")
    return {k[len("encoder."):]: v for k, v in bundle.state_dict().items()
            if k.startswith("encoder.")}


def create_gallery(source: PathLike, data: PathLike, out: PathLike, *,
                   config: GalleryConfig | GalleryCreateConfig = GalleryConfig(),
                   workers: int | None = None, acceptance: float | None = None) -> Bundle:
    """A new gallery bundle at ``out`` from the encoder of ``source`` (a gallery bundle, on
    either encoder, or a ``siamese`` classifier bundle) with every image of the class folders
    under ``data`` enrolled (a train/val/test layout enrols its train split only). With
    ``acceptance`` the similarity threshold is fitted on the enrolled images (see
    :func:`fit_threshold`). The logit scale is fitted on the enrolled images held out in turn
    (:mod:`~imgtriage.predict.gallery_scale`) unless given (a ``GalleryCreateConfig``'s
    ``scale``, or a ``GalleryConfig`` scale other than the default 10).
    ``config``: the rule, or a ``GalleryCreateConfig`` (the rule and the acceptance, what
    ``imgtriage gallery create`` builds from its options).

    Example:
        >>> create_gallery("runs/fs/bundle", "new_targets/", "targets.gallery")  # doctest: +SKIP
    """
    from imgtriage.data import discover, samples_by_split
    from imgtriage.models.gallery import DEFAULT_SCALE
    from imgtriage.models.gallery_encoder import build_gallery_encoder
    from imgtriage.models.siamese import encoder_kwargs
    from imgtriage.predict.gallery_scale import given_or_held_out

    if isinstance(config, GalleryCreateConfig):
        if acceptance is not None:
            raise ConfigError("give the acceptance in the GalleryCreateConfig, not both")
        scale_given = config.scale is not None
        config, acceptance = config.gallery(), config.acceptance
    else:
        scale_given = config.scale != DEFAULT_SCALE
    src = load_bundle(source)
    state = encoder_state(src)
    m = src.info.model
    encoder = None  # a gallery's encoder embeds as that gallery predicts (its graph)
    name, kwargs = m.name, dict(m.kwargs)
    if src.info.kind != "gallery":  # the encoder inside a siamese classifier
        name, kwargs = "siamese", encoder_kwargs(kwargs)
        encoder = build_gallery_encoder(name, m.in_chans, kwargs)
        encoder.load_state_dict(state, strict=True)
        encoder.eval()
    samples = samples_by_split(discover(data)).get("train", [])
    if not samples:
        raise DataError(f"{data} holds no training images to enrol")
    emb = embed_files(src, [s.path for s in samples], encoder, workers)
    gallery = Gallery.build(emb, [s.label for s in samples], [s.path for s in samples])
    fit = None
    if acceptance is not None:
        threshold, fit = fit_similarity_threshold(gallery, config, acceptance)
        config = replace(config, similarity_threshold=threshold)
    config, scale_fit = given_or_held_out(gallery, config, scale_given)
    manifest = new_gallery_manifest(
        encoder=name, encoder_kwargs=kwargs, in_chans=m.in_chans,
        preprocess=dict(src.info.preprocess), gallery=gallery, config=config,
        training={"kind": "gallery", "encoder_from": str(Path(source)),
                  "encoder_bundle_sha256": src.sha256, "data": str(data)})
    save_gallery_bundle(out, manifest.with_changes(threshold_fit=fit, scale_fit=scale_fit),
                        state, gallery)
    return load_bundle(out)
