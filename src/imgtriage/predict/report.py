"""The batch report format (README.md, "The report"): meta, results, defects; and its writers."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgtriage._version import __version__
from imgtriage.errors import ConfigError

REPORT_FORMATS = (".json",)

UNKNOWN_CLASS_ID = -1
"""``class_id`` of an abstained row (answered ``unknown_label``), in every output format and
over HTTP; the best class's name stays in ``best_class`` and its probability in ``score``."""


def result_row(path: str, class_name: str, class_id: int, score: float, abstained: bool, *,
               probs: dict[str, float] | None = None, topk: list[dict[str, Any]] | None = None,
               pred_set: list[str] | None = None, flags: list[str] | None = None,
               extra: dict[str, Any] | None = None, best_class: str | None = None,
               reason: str | None = None) -> dict[str, Any]:
    """One entry of ``results``; optional keys appear only when asked for.

    ``class_id`` is the best class's index; an abstained row has ``class_id``
    :data:`UNKNOWN_CLASS_ID` (-1), its ``class`` is the unknown label, and ``best_class``
    names the class it would have answered (whose probability ``score`` still is).
    ``reason`` says why a row abstained (``out_of_distribution``, ``low_confidence`` or
    ``ambiguous``); it is None for answered rows and always present.

    Example:
        >>> result_row("a.png", "unknown", 2, 0.41, True, best_class="sar")["class_id"]
        -1
    """
    row: dict[str, Any] = {"path": path, "class": class_name,
                           "class_id": UNKNOWN_CLASS_ID if abstained else int(class_id),
                           "score": round(float(score), 6), "abstained": bool(abstained),
                           "reason": (reason or "low_confidence") if abstained else None}
    if abstained and best_class is not None:
        row["best_class"] = best_class
    if probs is not None:
        row["probs"] = probs
    if topk is not None:
        row["topk"] = topk
    if pred_set is not None:
        row["set"] = pred_set
    if flags:
        row["flags"] = flags
    if extra:
        row.update(extra)
    return row


def meta_flags(meta: dict[str, Any] | None) -> list[str] | None:
    """A result row's ``flags`` from its image's read metadata: ``degenerate`` (a constant
    image), ``partial`` (a truncated file read as far as it goes, see ``meta["partial"]``),
    ``features_imputed`` (an image + feature bundle got the training median for a header
    card or manifest column the input lacks).

    Example:
        >>> meta_flags({"degenerate": False, "partial": {"rows_read": 60, "rows": 100}})
        ['partial']
    """
    if not meta:
        return None
    flags = [name for name in ("degenerate", "partial", "features_imputed") if meta.get(name)]
    return flags or None


def report_meta(*, bundle_path: str, bundle_sha256: str, decision: dict[str, Any],
                classes: list[str], batch_size: int, num_files: int, n_results: int,
                n_abstained: int, elapsed_sec: float, tta: bool = False,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``meta`` block: enough to know which model and which rule produced the results."""
    meta = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "bundle": bundle_path,
        "bundle_sha256": bundle_sha256,
        "temperature": decision.get("temperature", 1.0),
        "thresholds": decision.get("thresholds"),
        "tta": tta,
        "abstain": decision.get("abstain", False),
        "unknown_label": decision.get("unknown_label", "unknown"),
        "profile": decision.get("profile", "default"),
        "batch_size": batch_size,
        "coverage": round(1 - n_abstained / n_results, 6) if n_results else None,
        "num_files": num_files,
        "classes": classes,
        "elapsed_sec": round(elapsed_sec, 3),
        "version": __version__,
    }
    meta.update(extra or {})
    return meta


def stage_counts(n1: int, n2: int, ood: int | None = None) -> dict[str, Any]:
    """A cascade report's per-stage counts (``meta["cascade"]``): files each stage answered,
    and (``ood``, for a cascade with an OOD gate) ``stage1_ood``: how many of stage 2's the
    first stage's OOD gate sent there.

    Example:
        >>> stage_counts(3, 1)["stage1_share"]
        0.75
        >>> stage_counts(3, 1, ood=1)["stage1_ood"]
        1
    """
    n = n1 + n2
    out = {"stage1": n1, "stage2": n2, "stage1_share": round(n1 / n, 6) if n else None,
           "stage2_share": round(n2 / n, 6) if n else None}
    return out if ood is None else {**out, "stage1_ood": ood}


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a report; the format follows the extension (.json here; see predict.sinks)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in REPORT_FORMATS:
        from imgtriage.predict import sinks

        return sinks.write_report_as(report, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path


def check_output_path(path: str | os.PathLike[str]) -> None:
    """Fail before a long run, not after it, when the output format is unknown."""
    suffix = Path(path).suffix.lower()
    known = (*REPORT_FORMATS, ".jsonl", ".csv", ".parquet")
    if suffix not in known:
        raise ConfigError(f"unknown report format {suffix!r} for {path}; use one of "
                          f"{', '.join(known)} (--output)")
