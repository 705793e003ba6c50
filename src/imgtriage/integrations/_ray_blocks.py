"""What runs inside Ray workers: decode a block of paths, classify a batch in an actor.

Both stages take and return plain column batches (``dict[str, np.ndarray]`` in, a
``pyarrow.Table`` out of the model stage), so they are tested without a cluster. The
table's fixed :data:`row_schema` is also the schema of the Parquet dataset a huge run
writes: the columns of :mod:`imgtriage.predict.sinks` plus ``index`` (the file's position
in the listing, which restores input order).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from imgtriage.errors import require
from imgtriage.io import Defect

BASE_KEYS = ("path", "class", "class_id", "score", "abstained")
EXTRA_KEYS = ("probs", "topk", "set", "flags")  # a column each; any other key goes to "extra"
_SPECS: dict[str, Any] = {}  # one parsed PreprocessSpec per worker process


def row_schema():
    """Arrow schema of every output block (and of the Parquet dataset)."""
    pa = require("pyarrow", "ray")
    return pa.schema([
        ("index", pa.int64()), ("kind", pa.string()), ("path", pa.string()),
        ("class", pa.string()), ("class_id", pa.int64()), ("score", pa.float64()),
        ("abstained", pa.bool_()), ("issue", pa.string()), ("message", pa.string()),
        *[(k, pa.string()) for k in EXTRA_KEYS], ("extra", pa.string()),
    ])


def _spec(spec: dict[str, Any]):
    from imgtriage.data.preprocess import PreprocessSpec

    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _SPECS:
        _SPECS[key] = PreprocessSpec.from_dict(spec)
    return _SPECS[key]


def _decode_one(path: str, cwd: str, spec: Any) -> tuple[np.ndarray, dict[str, Any]] | Defect:
    """Decode ``path`` (relative to the driver's ``cwd``) exactly as the local engine does;
    a defect names the path as the user gave it."""
    from imgtriage.predict.batch import decode_file

    full = os.path.join(cwd, path)
    out = decode_file(full, spec)
    if isinstance(out, Defect) and full != path:
        return Defect(path, out.issue, out.message.replace(full, path))
    return out


def decode_batch(batch: dict[str, np.ndarray], *, spec: dict[str, Any],
                 cwd: str) -> dict[str, np.ndarray]:
    """CPU stage: paths -> model inputs. A file that fails becomes ``ok=False`` with its
    issue and message, and a zero input of the right shape, so one bad file never fails a
    block.

    Example:
        >>> out = decode_batch({"index": np.arange(1), "path": np.array(["nope.png"])},
        ...                    spec={"in_chans": 1, "size": [8, 8], "mean": [0.5],
        ...                          "std": [0.25]}, cwd="/")
        >>> out["ok"].tolist(), out["issue"].tolist(), out["x"].shape
        ([False], ['not_found'], (1, 1, 8, 8))
    """
    s = _spec(spec)
    n = len(batch["path"])
    x = np.zeros((n, s.in_chans, *s.size), np.float32)
    ok = np.zeros(n, bool)
    degenerate = np.zeros(n, bool)
    issue = np.full(n, "", dtype=object)
    message = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        out = _decode_one(str(path), cwd, s)
        if not isinstance(out, Defect):
            if out[0].shape == x.shape[1:]:
                x[i], ok[i] = out[0], True
                degenerate[i] = bool(out[1].get("degenerate"))
                continue
            out = Defect(str(path), "decode_error",
                         f"input shape {out[0].shape} differs from {x.shape[1:]}")
        issue[i], message[i] = out.issue, out.message
    paths = [str(p) for p in batch["path"]]
    return {"index": np.asarray(batch["index"], np.int64),
            "path": np.asarray(paths, dtype=object),
            "full": np.asarray([os.path.join(cwd, p) for p in paths], dtype=object),
            "ok": ok, "degenerate": degenerate, "issue": issue, "message": message, "x": x}


def result_record(index: int, row: dict[str, Any]) -> dict[str, Any]:
    """A report result row -> one flat record (extras JSON-encoded, as in predict.sinks)."""
    rec = {"index": index, "kind": "result", "issue": None, "message": None,
           **{k: row[k] for k in BASE_KEYS}}
    for k in EXTRA_KEYS:
        rec[k] = json.dumps(row[k]) if k in row else None
    other = {k: v for k, v in row.items() if k not in BASE_KEYS and k not in EXTRA_KEYS}
    rec["extra"] = json.dumps(other) if other else None
    return rec


def defect_record(index: int, path: str, issue: str, message: str) -> dict[str, Any]:
    return {"index": index, "kind": "defect", "path": path, "class": None, "class_id": None,
            "score": None, "abstained": None, "issue": issue, "message": message,
            **dict.fromkeys(EXTRA_KEYS), "extra": None}


def from_record(rec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One flat record -> ``("result", row)`` or ``("defect", {path, issue, message})``,
    the same dicts the local engine puts in a report.

    Example:
        >>> from_record(defect_record(0, "a.png", "empty_file", "0 bytes"))
        ('defect', {'path': 'a.png', 'issue': 'empty_file', 'message': '0 bytes'})
    """
    if rec["kind"] == "defect":
        return "defect", {"path": rec["path"], "issue": rec["issue"], "message": rec["message"]}
    row = {k: rec[k] for k in BASE_KEYS}
    for k in EXTRA_KEYS:
        if rec.get(k) is not None:
            row[k] = json.loads(rec[k])
    if rec.get("extra") is not None:
        row.update(json.loads(rec["extra"]))
    return "result", row


class BatchClassifier:
    """Model stage: a Ray actor loads the bundle once, then turns decoded batches into rows.

    Example:
        >>> clf = BatchClassifier("runs/digits/bundle", {"include_probs": True})  # doctest: +SKIP
        >>> clf(decode_batch(paths_batch, spec=spec, cwd=".")).num_rows  # doctest: +SKIP
        32
    """

    def __init__(self, bundle: str, options: dict[str, Any], backend: str = "auto",
                 device: str = "cpu", num_threads: int | None = None) -> None:
        from imgtriage.predict import PredictOptions, Predictor

        self.predictor = Predictor.load(bundle, backend=backend, device=device,
                                        num_threads=num_threads)
        self.opts = PredictOptions(**options)

    def __call__(self, batch: dict[str, np.ndarray]):
        pa = require("pyarrow", "ray")
        ok = np.asarray(batch["ok"], bool)
        good = np.flatnonzero(ok)
        rows: dict[int, dict[str, Any]] = {}
        if len(good):
            x = np.ascontiguousarray(np.asarray(batch["x"])[good], dtype=np.float32)
            # full paths: a cascade reads the file again, and actors have their own cwd
            names = [str(batch["full"][i]) for i in good]
            metas = [{"degenerate": bool(batch["degenerate"][i])} for i in good]
            out = self.predictor.rows_for_inputs(x, names, self.opts, metas)
            rows = dict(zip(good.tolist(), out, strict=True))
        records = [self._record(int(idx), str(batch["path"][i]), str(batch["full"][i]),
                                rows.get(i), str(batch["issue"][i]), str(batch["message"][i]))
                   for i, idx in enumerate(batch["index"])]
        return pa.Table.from_pylist(records, schema=row_schema())

    @staticmethod
    def _record(index: int, path: str, full: str, row: dict[str, Any] | None, issue: str,
                message: str) -> dict[str, Any]:
        if row is None:
            return defect_record(index, path, issue, message)
        if "issue" in row and "class" not in row:  # a model-side defect
            return defect_record(index, path, row["issue"], row["message"].replace(full, path))
        return result_record(index, {**row, "path": path})
