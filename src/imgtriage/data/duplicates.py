"""Byte-identical files across splits, found by content digest when the splits are built.

A validation image whose bytes equal a training image's scores the model on what it was
trained on: validation accuracy is inflated, and validation is what fits the temperature, the
thresholds and the OOD rule. :func:`check_duplicates` hashes every sample once (sha256 of the
file's bytes, the io digest helper, on ``workers`` threads), removes validation copies of
training images (by default), and reports test copies of training images and identical bytes
filed under two different labels by name. The training digests (8-byte prefixes, sorted) go
into the bundle, so ``evaluate`` can say when the images it scores were trained on.

Example:
    >>> ds, dups = check_duplicates(split_dataset(discover("data")))  # doctest: +SKIP
    >>> dups.summary()["val_copies_removed"]  # doctest: +SKIP
    3
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from imgtriage.data.discovery import Dataset
from imgtriage.io import sha256_file

DIGEST_BYTES = 8  # a 64-bit prefix: a chance collision among a million files is ~3e-8
TRAIN_DIGESTS = "train_digests.safetensors"  # the bundle file of the training images' digests
NAMED = 20  # paths named in a summary / a printed line (the counts are always complete)


def content_digest(path: str | os.PathLike[str]) -> bytes | None:
    """The first :data:`DIGEST_BYTES` of the sha256 of the file's bytes; None if unreadable
    (an unreadable file cannot be a copy; the loader reports it as a defect)."""
    try:
        return bytes.fromhex(sha256_file(path))[:DIGEST_BYTES]
    except OSError:
        return None


def content_digests(paths: Sequence[str], workers: int = 2) -> dict[str, bytes]:
    """path -> :func:`content_digest` for every readable file, hashed on ``workers`` threads."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(content_digest, paths, chunksize=64))
    return {p: d for p, d in zip(paths, digests, strict=True) if d is not None}


def pack_digests(digests: Iterable[bytes]) -> bytes:
    """Sorted unique digests as the bytes of a safetensors file (one uint8 tensor
    ``digests`` of shape (n, 8)): what the bundle stores, data only, like its weights."""
    from safetensors.numpy import save

    rows = sorted(set(digests))
    table = np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), DIGEST_BYTES)
    return save({"digests": table})


def unpack_digests(blob: bytes) -> frozenset[bytes]:
    """The digests :func:`pack_digests` stored."""
    from safetensors.numpy import load

    table = load(blob)["digests"]
    return frozenset(bytes(row) for row in table)


@dataclass(frozen=True)
class DuplicateCheck:
    """What :func:`check_duplicates` found.

    Attributes:
        val_copies: validation files with the bytes of a training file.
        removed: whether those were taken out of validation.
        test_copies: test files with the bytes of a training file (kept: a warning).
        conflicts: groups of ``(path, label)`` sharing their bytes under two or more labels.
        train_digests: :func:`pack_digests` of the training files.
        hashed: files hashed; ``seconds``: how long it took.
    """

    val_copies: tuple[str, ...] = ()
    removed: bool = True
    test_copies: tuple[str, ...] = ()
    conflicts: tuple[tuple[tuple[str, str], ...], ...] = ()
    train_digests: bytes = b""
    hashed: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """For run.json and the bundle's training block (counts complete, names capped)."""
        return {"method": f"sha256 of the file bytes ({DIGEST_BYTES}-byte prefix)",
                "files_hashed": self.hashed, "seconds": round(self.seconds, 3),
                "val_copies_of_train": len(self.val_copies),
                "val_copies_removed": len(self.val_copies) if self.removed else 0,
                "val_copies": list(self.val_copies[:NAMED]),
                "test_copies_of_train": len(self.test_copies),
                "test_copies": list(self.test_copies[:NAMED]),
                "label_conflicts": len(self.conflicts),
                "conflicts": [[{"path": p, "label": lab} for p, lab in g]
                              for g in self.conflicts[:NAMED]]}

    def lines(self) -> list[str]:
        """What the train output says: one line, plus a warning per kind of problem."""
        out = [f"duplicates: {self.hashed} files hashed in {self.seconds:.2f}s; "
               f"{len(self.val_copies)} validation copies of training images"
               + (" removed from validation (--no-dedupe-val keeps them)" if self.removed
                  and self.val_copies else " kept (--no-dedupe-val)" if self.val_copies
                  else "")
               + f", {len(self.test_copies)} test copies, {len(self.conflicts)} images "
               "under two labels"]
        if self.val_copies and not self.removed:
            out.append(f"warning: {len(self.val_copies)} validation images are byte copies "
                       f"of training images ({_names(self.val_copies)}): validation "
                       "metrics, the temperature, thresholds and OOD rule are fitted partly "
                       "on seen images")
        if self.test_copies:
            out.append(f"warning: {len(self.test_copies)} test images are byte copies of "
                       f"training images ({_names(self.test_copies)}): test metrics will "
                       "overstate accuracy on new images; remove them from test")
        for group in self.conflicts[:NAMED]:
            out.append("warning: the same bytes under different labels: "
                       + ", ".join(f"{p} ({lab})" for p, lab in group)
                       + "; fix the label or remove the copy")
        if len(self.conflicts) > NAMED:
            out.append(f"warning: {len(self.conflicts) - NAMED} more groups of identical "
                       "images under different labels (run.json 'duplicates')")
        return out


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def check_duplicates(ds: Dataset, *, drop_val_copies: bool = True, workers: int = 2
                     ) -> tuple[Dataset, DuplicateCheck]:
    """Find byte-identical files across the splits of ``ds`` (splits already assigned).

    Returns the dataset (without the validation copies of training images when
    ``drop_val_copies``) and what was found.
    """
    t0 = time.perf_counter()
    digests = content_digests([s.path for s in ds.samples], workers)
    train = {digests[s.path] for s in ds.samples
             if (s.split or "train") == "train" and s.path in digests}

    def copies(split: str) -> tuple[str, ...]:
        return tuple(s.path for s in ds.samples
                     if s.split == split and digests.get(s.path) in train)

    val_copies, test_copies = copies("val"), copies("test")
    by_digest: dict[bytes, list[tuple[str, str]]] = defaultdict(list)
    for s in ds.samples:
        if s.path in digests:
            by_digest[digests[s.path]].append((s.path, s.label))
    conflicts = tuple(tuple(g) for g in by_digest.values() if len({lab for _, lab in g}) > 1)
    if drop_val_copies and val_copies:
        gone = set(val_copies)
        ds = replace(ds, samples=tuple(s for s in ds.samples
                                       if not (s.split == "val" and s.path in gone)))
    return ds, DuplicateCheck(val_copies, drop_val_copies, test_copies, conflicts,
                              pack_digests(train), len(digests), time.perf_counter() - t0)
