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
import pickle
from typing import Any

import numpy as np

from imgtriage.errors import require
from imgtriage.predict.base import Decoded, Decoder, Entry, decode_entry, is_defect

BASE_KEYS = ("path", "class", "class_id", "score", "abstained")
EXTRA_KEYS = ("probs", "topk", "set", "flags")  # a column each; any other key goes to "extra"


def row_schema():
    """Arrow schema of every output block (and of the Parquet dataset)."""
    pa = require("pyarrow", "ray")
    return pa.schema([
        ("index", pa.int64()), ("kind", pa.string()), ("path", pa.string()),
        ("class", pa.string()), ("class_id", pa.int64()), ("score", pa.float64()),
        ("abstained", pa.bool_()), ("issue", pa.string()), ("message", pa.string()),
        *[(k, pa.string()) for k in EXTRA_KEYS], ("extra", pa.string()),
    ])


def _decode_one(path: str, cwd: str, decoder: Decoder) -> Entry:
    """Decode ``path`` (relative to the driver's ``cwd``) with the kind's own decoder, exactly
    as the local engine does; rows and defects name the path as the user gave it."""
    return decode_entry(decoder, os.path.join(cwd, path), path)


def decode_batch(batch: dict[str, np.ndarray], *, decoder: Decoder,
                 cwd: str) -> dict[str, np.ndarray]:
    """CPU stage: paths -> decoded inputs (``decoded``: each :class:`Decoded`, pickled for
    the trip to the model actors). A file that fails becomes ``ok=False`` with its issue and
    message, so one bad file never fails a block.

    Example:
        >>> from imgtriage.data.preprocess import PreprocessSpec
        >>> from imgtriage.predict.predictor import ClassifierDecoder
        >>> out = decode_batch({"index": np.arange(1), "path": np.array(["nope.png"])},
        ...                    decoder=ClassifierDecoder(PreprocessSpec.default_for(1, (8, 8))),
        ...                    cwd="/")
        >>> out["ok"].tolist(), out["issue"].tolist(), out["decoded"].tolist()
        ([False], ['not_found'], [b''])
    """
    n = len(batch["path"])
    ok = np.zeros(n, bool)
    decoded = np.full(n, b"", dtype=object)
    issue = np.full(n, "", dtype=object)
    message = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        out = _decode_one(str(path), cwd, decoder)
        if isinstance(out, Decoded):
            decoded[i], ok[i] = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL), True
        else:
            issue[i], message[i] = out["issue"], out["message"]
    return {"index": np.asarray(batch["index"], np.int64),
            "path": np.asarray([str(p) for p in batch["path"]], dtype=object),
            "ok": ok, "issue": issue, "message": message, "decoded": decoded}


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
        >>> clf(decode_batch(paths_batch, decoder=p.decoder, cwd=".")).num_rows  # doctest: +SKIP
        32
    """

    def __init__(self, bundle: str, options: dict[str, Any], backend: str = "auto",
                 device: str = "cpu", num_threads: int | None = None) -> None:
        from imgtriage.predict import Predictor

        self.predictor = Predictor.load(bundle, backend=backend, device=device,
                                        num_threads=num_threads)
        self.opts = self.predictor.options(**options)

    def __call__(self, batch: dict[str, np.ndarray]):
        pa = require("pyarrow", "ray")
        ok = np.asarray(batch["ok"], bool)
        good = np.flatnonzero(ok)
        # the decode tasks' own output (never a bundle): Decoded inputs for this kind's rows
        entries: list[Decoded] = [pickle.loads(batch["decoded"][i]) for i in good]
        rows = dict(zip(good.tolist(), self.predictor.predict_entries(entries, self.opts),
                        strict=True))
        records = [self._record(int(idx), str(batch["path"][i]), rows.get(i),
                                str(batch["issue"][i]), str(batch["message"][i]))
                   for i, idx in enumerate(batch["index"])]
        return pa.Table.from_pylist(records, schema=row_schema())

    @staticmethod
    def _record(index: int, path: str, row: dict[str, Any] | None, issue: str,
                message: str) -> dict[str, Any]:
        if row is None:
            return defect_record(index, path, issue, message)
        if is_defect(row):  # a model-side defect
            return defect_record(index, path, row["issue"], row["message"])
        return result_record(index, {**row, "path": path})
