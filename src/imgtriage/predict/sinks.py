"""Report writers for large runs: JSONL, CSV and Parquet (rows of results and defects)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError, require

ROW_COLUMNS = ("kind", "path", "class", "class_id", "score", "abstained", "issue", "message")


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a report into rows: ``kind`` is "result" or "defect"; extras JSON-encoded."""
    rows = []
    for r in report["results"]:
        row = {"kind": "result", **{k: r.get(k) for k in ROW_COLUMNS[1:6]},
               "issue": None, "message": None}
        for key in ("probs", "topk", "set", "flags", "stage"):
            if key in r:
                row[key] = json.dumps(r[key]) if not isinstance(r[key], str) else r[key]
        rows.append(row)
    for d in report["defects"]:
        rows.append({"kind": "defect", "path": d["path"], "class": None, "class_id": None,
                     "score": None, "abstained": None, "issue": d["issue"],
                     "message": d["message"]})
    return rows


def write_report_as(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write by extension: .jsonl (a meta line, then one line per row), .csv, .parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = report_rows(report)
    columns = list(ROW_COLUMNS) + sorted({k for r in rows for k in r} - set(ROW_COLUMNS))
    tmp = path.with_name(path.name + ".tmp")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with tmp.open("w") as fh:
            fh.write(json.dumps({"kind": "meta", **report["meta"]}) + "\n")
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    elif suffix == ".csv":
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        pa = require("pyarrow", "parquet")
        pq = require("pyarrow.parquet", "parquet")
        table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
        table = table.replace_schema_metadata({"imgtriage_meta": json.dumps(report["meta"])})
        pq.write_table(table, tmp)
    else:
        raise ConfigError(f"unknown report format {suffix!r}; use .json, .jsonl, .csv or "
                          ".parquet (--output)")
    os.replace(tmp, path)
    return path
