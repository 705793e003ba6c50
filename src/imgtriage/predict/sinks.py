"""Report writers: JSON, JSONL, CSV and Parquet, streamed so memory stays flat.

Every writer takes the ``meta`` block and two *factories* returning iterables of result rows
and defects, so the same code writes an in-memory report and a store with millions of rows.
Files are written to ``<name>.tmp`` and renamed, so a killed run never leaves half a report.

Flat formats (JSONL, CSV, Parquet) have one row per file with ``kind`` "result" or "defect";
extra result keys (probs, topk, set, flags, stage, ...) are JSON-encoded strings there.
JSONL starts with a ``{"kind": "meta", ...}`` line (where a gallery report's own ``kind`` is
``bundle_kind``); Parquet keeps ``meta`` as JSON in the schema metadata (key
``imgtriage_meta``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError, require

ROW_COLUMNS = ("kind", "path", "class", "class_id", "score", "abstained", "reason", "issue",
               "message")
RESULT_KEYS = frozenset(ROW_COLUMNS[1:7])
FORMATS = (".json", ".jsonl", ".csv", ".parquet")
Rows = Callable[[], Iterable[dict[str, Any]]]


def safe_text(text: str) -> str:
    """A file name (or a message naming one) as text every report format can hold.

    Names that are not valid UTF-8 arrive from the OS as surrogate escapes (``os.fsdecode``);
    their bytes are shown as ``\\xNN`` escapes. Valid text is returned unchanged. The result
    store keeps the exact bytes.

    Example:
        >>> safe_text(os.fsdecode(b"caf\\xe9.png"))
        'caf\\\\xe9.png'
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def safe_item(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` with its path and message made safe (see :func:`safe_text`)."""
    fixed = {k: safe_text(item[k]) for k in ("path", "message")
             if isinstance(item.get(k), str)}
    return {**item, **fixed} if any(fixed[k] is not item[k] for k in fixed) else item


# A spreadsheet runs a cell starting with these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """Neutralise a text cell a spreadsheet would run as a formula: prefix it with ``'``.

    Plain numbers (``-0.5``) are kept as they are.

    Example:
        >>> print(csv_cell('=HYPERLINK("http://x")'), csv_cell("-0.5"), csv_cell("cat"))
        '=HYPERLINK("http://x") -0.5 cat
    """
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def extra_keys(results: Iterable[dict[str, Any]]) -> list[str]:
    """Result keys beyond the standard columns, sorted."""
    return sorted({k for r in results for k in r} - RESULT_KEYS)


def flat_row(kind: str, item: dict[str, Any], extras: Sequence[str]) -> dict[str, Any]:
    """One result or defect as a flat row of ``ROW_COLUMNS`` + ``extras``."""
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
    item = safe_item(item)
    row["kind"] = kind
    if kind == "result":
        row.update({k: item.get(k) for k in ROW_COLUMNS[1:7]})
    else:
        row.update(path=item["path"], issue=item["issue"], message=item["message"])
    for key in extras:
        value = item.get(key) if kind == "result" else None
        row[key] = value if value is None or isinstance(value, str) else json.dumps(value)
    return row


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten an in-memory report into rows (results first, then defects)."""
    extras = extra_keys(report["results"])
    return [*(flat_row("result", r, extras) for r in report["results"]),
            *(flat_row("defect", d, extras) for d in report["defects"])]


def write_report_as(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write an in-memory report by extension: .json, .jsonl, .csv or .parquet."""
    return write_stream(path, report["meta"], lambda: report["results"],
                        lambda: report["defects"], extra_keys(report["results"]))


def write_stream(path: str | os.PathLike[str], meta: dict[str, Any], results: Rows,
                 defects: Rows, extras: Sequence[str] = ()) -> Path:
    """Write a report from row factories (each called once); the format follows the extension.

    Example:
        >>> write_stream("out.csv", meta, lambda: rows, lambda: [])  # doctest: +SKIP
    """
    path = Path(path)
    suffix = path.suffix.lower()
    writers = {".json": _write_json, ".jsonl": _write_jsonl, ".csv": _write_csv,
               ".parquet": _write_parquet}
    if suffix not in writers:
        raise ConfigError(f"unknown report format {suffix!r} for {path}; use one of "
                          f"{', '.join(FORMATS)} (--output)")
    with _atomic(path) as tmp:
        writers[suffix](tmp, meta, results, defects, list(extras))
    return path


def _flat(results: Rows, defects: Rows, extras: list[str]) -> Iterator[dict[str, Any]]:
    for r in results():
        yield flat_row("result", r, extras)
    for d in defects():
        yield flat_row("defect", d, extras)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(tmp: Path, meta: dict[str, Any], results: Rows, defects: Rows,
                extras: list[str]) -> None:
    with tmp.open("w") as fh:
        fh.write('{"meta": ' + json.dumps(meta, indent=2) + ',\n"results": [')
        _json_list(fh, results())
        fh.write('],\n"defects": [')
        _json_list(fh, defects())
        fh.write("]}\n")


def _json_list(fh: Any, items: Iterable[dict[str, Any]]) -> None:
    sep = "\n"
    for item in items:
        fh.write(sep + json.dumps(safe_item(item)))
        sep = ",\n"
    if sep != "\n":
        fh.write("\n")


def _write_jsonl(tmp: Path, meta: dict[str, Any], results: Rows, defects: Rows,
                 extras: list[str]) -> None:
    with tmp.open("w") as fh:
        # "kind" says what a line is; a report's own "kind" (a gallery's) is "bundle_kind"
        line = {("bundle_kind" if k == "kind" else k): v for k, v in meta.items()}
        fh.write(json.dumps({"kind": "meta", **line}) + "\n")
        for row in _flat(results, defects, extras):
            fh.write(json.dumps(row) + "\n")


def _write_csv(tmp: Path, meta: dict[str, Any], results: Rows, defects: Rows,
               extras: list[str]) -> None:
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*ROW_COLUMNS, *extras], extrasaction="ignore")
        w.writeheader()
        for row in _flat(results, defects, extras):
            w.writerow({k: csv_cell(v) for k, v in row.items()})


def _write_parquet(tmp: Path, meta: dict[str, Any], results: Rows, defects: Rows,
                   extras: list[str], batch: int = 4096) -> None:
    pa = require("pyarrow", "parquet")
    pq = require("pyarrow.parquet", "parquet")
    types = {"class_id": pa.int64(), "score": pa.float64(), "abstained": pa.bool_()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in (*ROW_COLUMNS, *extras)],
                       metadata={"imgtriage_meta": json.dumps(meta)})
    with pq.ParquetWriter(tmp, schema) as writer:
        buf: list[dict[str, Any]] = []
        written = 0
        for row in _flat(results, defects, extras):
            buf.append(row)
            if len(buf) >= batch:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                written, buf = written + len(buf), []
        if buf or not written:  # an empty report is still a valid file with the schema
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))


def write_defect_log(path: str | os.PathLike[str], defects: Iterable[dict[str, Any]]) -> Path:
    """The defects alone: a JSON list of ``{path, issue, message}`` (or JSONL by extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ConfigError(f"the defect log must be .json or .jsonl, got {path} (--defect-log)")
    with _atomic(path) as tmp, tmp.open("w") as fh:
        if suffix == ".jsonl":
            for d in defects:
                fh.write(json.dumps(safe_item(d)) + "\n")
        else:
            fh.write("[")
            _json_list(fh, defects)
            fh.write("]\n")
    return path
