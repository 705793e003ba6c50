"""Stratified, group-aware, seeded train/val/test splits, written next to the run."""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from imgtriage.data.discovery import Dataset, Sample, manifest_path
from imgtriage.errors import ConfigError, DataError


def _fractions_to_counts(n: int, fracs: dict[str, float]) -> dict[str, int]:
    """How many of n items each held-out split gets; keeps >= 1 for train when n >= 2."""
    counts = {k: round(n * f) for k, f in fracs.items()}
    if n >= 3:
        for k, f in fracs.items():
            if f > 0 and counts[k] == 0:
                counts[k] = 1
    while sum(counts.values()) >= n and any(counts.values()):
        k = max(counts, key=counts.get)
        counts[k] -= 1
    return counts


def _assign_units(units: list[str], fracs: dict[str, float], rng: np.random.Generator
                  ) -> dict[str, str]:
    order = list(units)
    rng.shuffle(order)
    counts = _fractions_to_counts(len(order), fracs)
    out, i = {}, 0
    for split, k in counts.items():
        for u in order[i:i + k]:
            out[u] = split
        i += k
    for u in order[i:]:
        out[u] = "train"
    return out


GROUP_HELP = ("A manifest's optional 'group' column names files that must stay together "
              "(frames of one recording, crops of one part, photos of one patient): a whole "
              "group goes to one split, so validation never sees a relative of a training "
              "image.")


def split_dataset(ds: Dataset, *, val_frac: float = 0.15, test_frac: float = 0.0,
                  seed: int = 0) -> Dataset:
    """Assign a split to every sample that has none; samples with a split keep it.

    A validation split always exists when ``val_frac > 0``: when the data names no ``val``
    split (a ``train/`` + ``test/`` layout, a manifest with only ``split=train/test``), it is
    carved from the training samples (those marked ``train`` and those without a split).

    Stratified by class; when samples carry a ``group``, whole groups go to one split (the
    group's majority class is used for stratification). Deterministic for a given seed.
    A grouping that leaves validation or training empty is a :class:`DataError` that says
    how to fix it.

    Example:
        >>> ds = split_dataset(discover("data"), val_frac=0.2, seed=1)  # doctest: +SKIP
    """
    if not 0 <= val_frac < 1 or not 0 <= test_frac < 1 or val_frac + test_frac >= 1:
        raise ConfigError("val/test fractions must be in [0, 1) and sum below 1 "
                          "(--val-frac/--test-frac)")
    has_val = any(s.split == "val" for s in ds.samples)
    has_test = any(s.split == "test" for s in ds.samples)
    fracs = {k: f for k, f in (("val", 0 if has_val else val_frac),
                               ("test", 0 if has_test else test_frac)) if f > 0}
    rng = np.random.default_rng(seed)
    # without a val split, the training samples are carved too; a given test split is kept
    free = {None} if has_val else {None, "train"}
    todo = [s for s in ds.samples if s.split in free]
    unit_of = {id(s): (s.group if s.group is not None else f"\0{s.path}") for s in todo}
    assignment = _assign(todo, unit_of, fracs, rng)
    samples = tuple(replace(s, split=assignment[unit_of[id(s)]]) if s.split in free else s
                    for s in ds.samples)
    _check_nonempty(samples, todo, fracs)
    _check_every_class_trains(samples, ds.classes)
    return replace(ds, samples=samples)


def _assign(todo: list[Sample], unit_of: dict[int, str], fracs: dict[str, float],
            rng: np.random.Generator) -> dict[str, str]:
    """Split of every unit (a group, or one file), stratified by the unit's majority class."""
    by_class: dict[str, list[str]] = defaultdict(list)
    unit_labels: dict[str, list[str]] = defaultdict(list)
    for s in todo:
        unit_labels[unit_of[id(s)]].append(s.label)
    for unit, labels in sorted(unit_labels.items()):
        major = max(sorted(set(labels)), key=labels.count)
        by_class[major].append(unit)
    assignment: dict[str, str] = {}
    for label in sorted(by_class):
        assignment.update(_assign_units(sorted(by_class[label]), fracs, rng))
    return assignment


def _check_nonempty(samples: tuple[Sample, ...], todo: list[Sample],
                    fracs: dict[str, float]) -> None:
    splits = {s.split for s in samples}
    grouped = any(s.group is not None for s in todo)
    n_units = len({s.group if s.group is not None else s.path for s in todo})
    how = (f" The {n_units} units being split are whole groups ('group' column): give more, "
           "smaller groups, or mark some rows split=val in the manifest." if grouped else "")
    if "train" not in splits:
        raise DataError("no sample left for training after the split; lower --val-frac/"
                        "--test-frac" + how)
    for split, frac in fracs.items():  # tiny ungrouped data may go without; groups may not
        if split not in splits and todo and grouped:
            raise DataError(f"the {split} split came out empty ({len(todo)} samples, "
                            f"--{split}-frac {frac}): raise --{split}-frac, add labelled "
                            f"images, or give rows split={split} yourself.{how}")


def _check_every_class_trains(samples: tuple[Sample, ...], classes: tuple[str, ...]) -> None:
    """A class with no training image would be an output the model never learnt to give."""
    where: dict[str, Counter[str]] = {c: Counter() for c in classes}
    for s in samples:
        where[s.label][s.split or "train"] += 1
    untrained = {c: n for c, n in where.items() if not n["train"]}
    if untrained:
        found = "; ".join(f"{c!r}: " + ", ".join(f"{k} in {split}" for split, k
                                                 in sorted(n.items()))
                          for c, n in untrained.items())
        raise DataError(f"{len(untrained)} class(es) have no training image ({found}), so the "
                        "model could never learn them; add training images of each (under "
                        "train/<class>/, or manifest rows with split=train or no split), or "
                        "take the class out of the data (to see how the bundle treats a class "
                        "it never saw, pass its images to `imgtriage evaluate --ood`)")


def write_split_manifest(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``path,label,group,split`` rows (CSV) so the run can be reproduced exactly; paths
    are absolute, so ``discover(path)`` finds the same files from any working directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)  # names that are not UTF-8 are written as their own bytes
        w.writerow(["path", "label", "group", "split"])
        for s in ds.samples:
            w.writerow([manifest_path(s.path), s.label, s.group or "", s.split or ""])
    return path


def samples_by_split(ds: Dataset) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    for s in ds.samples:
        out[s.split or "train"].append(s)
    return dict(out)
