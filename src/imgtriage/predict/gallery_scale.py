"""A gallery's logit scale, fitted like a temperature on held-out similarities.

A gallery answers with ``softmax(scale * similarity)``; a fixed ``scale`` (10) gives
probabilities that mean nothing in particular. Here the scale is fitted as a classifier's
temperature is (:func:`imgtriage.evaluate.fit_temperature`, the same NLL fit and the same
rule: kept only when it lowers the held-out NLL) on the similarities of items the gallery
did not see: the enrolled items held out in turn
(:func:`~imgtriage.models.gallery.held_out_similarities`), or a validation split where
training holds one out. A temperature ``T`` fitted on ``scale * similarity`` is the new scale
``scale / T``; argmax answers never change, only how confident they say they are.

Held out, an enrolled item is harder than a new image, and a fit on plain leave-one-out
similarities is under-confident (session 7: 5-shot CIFAR-10, fitted 24 where the test
optimum is 31). Its own class answers with a prototype of ``n - 1`` items where a new image
meets all ``n``, and a mean of fewer unit vectors is longer: a cosine to a prototype is the
mean cosine to the class's items over the length of their mean, so dividing by the longer
``n - 1`` mean makes every held-out own-class similarity low (the other classes' are what a
new image gets). ``prototype`` galleries therefore score the held-out item's own class at
its full count (:data:`FULL_COUNT`; :func:`~imgtriage.models.gallery.held_out_similarities`
``full_count``): its mean cosine to its ``n - 1`` class-mates, which has a new image's
expectation, over the length of the mean of all ``n``, the length new images are divided by.
It is exact in the mean, needs no model of the embeddings, no random choice and one fit, and
works for any count >= 2, class by class (an item alone in its class is left out, as
before). What it leaves is second order: that mean cosine averages ``n - 1`` class-mates,
not ``n``, so it is a little noisier than a new image's (on synthetic clusters a third of
plain leave-one-out's bias is left at 3 shots, almost none from 5). Measured
(``bench/bench_gallery_scale.py``; docs/benchmarks.md, issue 15) on CIFAR-10 and MSTAR with
the pretrained encoder: the fitted scale over the test optimum went from a median
0.53-0.55x (3 shots) and 0.85-0.93x (5 shots) to 0.99-1.10x, as close as a fit on as many
*new* images gets; what is left is the noise of fitting on a few dozen images. At 10 shots
the bias is small either way (CIFAR 0.98x before, 1.04x after; on MSTAR, whose test chips
are taken at another depression angle, 1.08x and 1.15x, and a fit on new train chips
1.13x). The alternative of holding one item out of *every* class and extrapolating the
scales fitted at ``n - 2`` and ``n - 1`` items to ``n`` came out as close, within that noise,
but needs 3 items per class, two fits on randomly thinned classes, and an extrapolation rule
of its own when classes have different counts. ``knn`` galleries keep plain leave-one-out (the best
match among ``n - 1`` class-mates against ``n`` depends on the embeddings' distribution; no
correction is known for them), and the record says so (``correction`` None).

Every class weighs alike in the fit (:func:`class_weights`): a gallery answers with no class
prior, and with uneven counts the rows of a class enrolled with many images would otherwise
set the scale for all (its prototype is better, so its items more separable): with 2 to
2K - 2 images per class the unweighted fit overshot the optimum of a class-balanced test set
by a median 8-19% (CIFAR-10) and 8-31% (MSTAR), the weighted one by -9% to +6%. With even
counts the weights change nothing.

The record (the manifest's ``scale_fit`` block) says the scale, the held-out NLL (weighted)
and ECE (unweighted) before and after, the rule, the ``correction`` and the ``weights``, and
why, in one ``line``; ``fixed`` marks a scale the user gave, which edits keep (an edit refits
a fitted scale on the edited gallery). The safeguard is the temperature's: the fitted scale is
kept only when it lowers the NLL of the rows it was fitted on, at the scale the gallery had.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 300)
    >>> sims = rng.normal(0.2, 0.1, (300, 3))
    >>> sims[np.arange(300), y] += 0.3  # the true class a little closer
    >>> scale, rec = fit_scale(sims, y, 10.0, rule="validation split")
    >>> rec["kept"], rec["nll_after"] < rec["nll_before"], round(scale) != 10
    (True, True, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgtriage.evaluate import fit_temperature
from imgtriage.models.gallery import (
    DEFAULT_SCALE,
    FULL_COUNT,
    Gallery,
    GalleryConfig,
    held_out_correction,
    held_out_similarities,
)

__all__ = ["FULL_COUNT", "LOO_RULE", "MIN_ITEMS", "VAL_RULE", "WEIGHTS", "class_weights",
           "fit_scale", "fixed_scale", "given_or_held_out", "held_out_scale", "scale_is_fixed",
           "scale_line"]

LOO_RULE = "enrolled items held out in turn"
WEIGHTS = "classes alike"
VAL_RULE = "validation split"
MIN_ITEMS = 4  # held-out items (with a class-mate left to match) a fit needs at least


def fit_scale(sims: np.ndarray, labels: np.ndarray, scale: float, *, rule: str,
              temperature: float = 1.0, correction: str | None = None
              ) -> tuple[float, dict[str, Any]]:
    """``(scale, record)``: the scale that minimises the NLL of ``labels`` under
    ``softmax(scale * sims / temperature)``, every class weighing alike (each row
    ``1 / its class's rows``: a gallery answers with no class prior, so a class enrolled
    with more images must not set the scale for the others), kept only when it lowers that
    NLL below the one at ``scale`` (else ``scale`` stays). ``temperature``: the bundle's
    decision temperature, applied after the scale (1 unless the bundle was calibrated
    since). Rows with a non-finite similarity (an item alone in its class, held out) are
    left out. ``correction``: how the held-out similarities were made like a new image's
    (recorded as given)."""
    sims = np.asarray(sims, np.float64)
    y = np.asarray(labels, np.int64)
    ok = np.isfinite(sims).all(axis=1)
    sims, y = sims[ok], y[ok]
    base = {"fixed": False, "rule": rule, "correction": correction, "weights": WEIGHTS,
            "n": len(y), "previous_scale": float(scale)}
    if len(y) < MIN_ITEMS or len(np.unique(y)) < 2:
        why = (f"only {len(y)} held-out items ({rule}) can be scored"
               if len(y) < MIN_ITEMS else f"the {rule} holds one class only")
        rec = {**base, "scale": float(scale), "kept": False,
               "note": f"not fitted: {why}; enrol two or more images per class"}
        return float(scale), {**rec, "line": scale_line(rec)}
    t, info = fit_temperature(sims * (scale / temperature), y, class_weights(y))
    new = float(scale / t) if info["kept"] else float(scale)
    rec = {**base, "scale": new, "kept": bool(info["kept"]),
           "fitted_scale": float(scale / info.get("fitted_temperature", t)),
           **{k: float(info[k]) for k in ("nll_before", "nll_after", "ece_before",
                                          "ece_after")},
           "note": None if info["kept"] else "the fitted scale did not lower the held-out NLL"}
    if "confidence_cap" in info:  # no held-out error: the NLL alone would run to its bound
        rec.update(confidence_cap=float(info["confidence_cap"]), note=info["note"])
    return new, {**rec, "line": scale_line(rec)}


def class_weights(y: np.ndarray) -> np.ndarray:
    """Each row ``1 / (rows of its class)``: every class weighs alike in a fit.

    Example:
        >>> class_weights(np.array([0, 0, 1])).tolist()
        [0.5, 0.5, 1.0]
    """
    y = np.asarray(y, np.int64)
    return 1.0 / np.bincount(y)[y] if len(y) else np.zeros(0)


def held_out_scale(gallery: Gallery, config: GalleryConfig, temperature: float = 1.0
                   ) -> tuple[GalleryConfig, dict[str, Any]]:
    """``config`` with its scale fitted on the enrolled items held out in turn, and the
    record (see :func:`fit_scale`). ``prototype`` galleries score each held-out item's own
    class at the prototype length of all its items (:data:`FULL_COUNT`, see the module
    docstring); ``knn`` ones as plain leave-one-out (no correction known for them)."""
    correction = held_out_correction(config.method)
    sims, y = held_out_similarities(gallery, config.method, config.k,
                                    full_count=correction is not None)
    scale, rec = fit_scale(sims, y, config.scale, rule=LOO_RULE, temperature=temperature,
                           correction=correction)
    rec["n_items"] = len(gallery)
    return GalleryConfig(**{**config.to_dict(), "scale": scale}), rec


def given_or_held_out(gallery: Gallery, config: GalleryConfig, given: bool,
                      how: str = "--scale") -> tuple[GalleryConfig, dict[str, Any]]:
    """``config`` and its scale's record: the scale as it is when the user gave it (``how``
    names the option; every edit keeps it), else fitted on the enrolled items held out in
    turn (:func:`held_out_scale`)."""
    if given:
        return config, fixed_scale(config.scale, how)
    return held_out_scale(gallery, config)


def fixed_scale(scale: float, why: str) -> dict[str, Any]:
    """The record of a scale the user gave (``why``: how), which no fit or edit changes."""
    rec = {"fixed": True, "scale": float(scale), "note": why}
    return {**rec, "line": scale_line(rec)}


def scale_is_fixed(record: dict[str, Any] | None, scale: float) -> bool:
    """Whether an edit keeps the scale as it is: a scale the user gave (``fixed``). A bundle
    written before scales were fitted has no record: its scale counts as given unless it is
    the old fixed default."""
    if record is None:
        return float(scale) != DEFAULT_SCALE
    return bool(record.get("fixed"))


def scale_line(rec: dict[str, Any]) -> str:
    """One line: the scale, the held-out NLL and ECE before/after, and why.

    Example:
        >>> scale_line({"fixed": True, "scale": 20.0, "note": "--scale"})
        'scale 20 (given: --scale; not fitted)'
    """
    s = f"{rec['scale']:.4g}"
    if rec.get("fixed"):
        return f"scale {s} (given: {rec['note']}; not fitted)"
    if "nll_before" not in rec:
        return f"scale {s} ({rec['note']})"
    how = ", ".join(x for x in (rec.get("correction"), rec.get("weights") and
                                 f"{rec['weights']} in the NLL") if x)
    where = f"on {rec['n']} {rec['rule']}" + (f" ({how})" if how else "")
    if rec["kept"]:
        capped = f"; {rec['note']}" if rec.get("confidence_cap") else ""
        return (f"scale {rec['previous_scale']:.4g} -> {s} fitted {where}: held-out NLL "
                f"{rec['nll_before']:.4f} -> {rec['nll_after']:.4f}, ECE "
                f"{rec['ece_before']:.4f} -> {rec['ece_after']:.4f}{capped}")
    return (f"scale {s} kept: the fitted {rec['fitted_scale']:.4g} did not lower the "
            f"held-out NLL {where} ({rec['nll_before']:.4f}; ECE {rec['ece_before']:.4f})")
