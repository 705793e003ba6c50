"""Celery tasks that classify files with a bundle loaded once per worker process.

Tasks (``shared_task`` s: they join whichever Celery app imports this module):

- ``imgtriage.classify_paths(paths, bundle=None, ...)`` -> the report dict of
  ``Predictor.predict_paths`` (meta, results, defects);
- ``imgtriage.classify_new_files(paths, store, bundle=None, ...)`` -> the report of the
  files the SQLite result store ``store`` has not seen yet (``imgtriage predict --store S
  --new-only``); run it from Celery beat to classify an inbox as it fills;
- ``imgtriage.worker_info()`` -> this process's pid and the bundles it holds.

``bundle`` defaults to the worker's ``IMGTRIAGE_BUNDLE``; ``IMGTRIAGE_BACKEND`` (auto,
torch, onnx) and ``IMGTRIAGE_THREADS`` (compute threads per process: cores / concurrency)
tune the load. A prefork child loads ``IMGTRIAGE_BUNDLE`` as it starts
(``worker_process_init``), other pools on the first task. Paths are paths on the worker.

Example:
    >>> from imgtriage.integrations.celery_tasks import classify_paths
    >>> classify_paths.delay(["/data/inbox"], include_probs=True).get()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtriage.errors import ConfigError, require

if TYPE_CHECKING:
    from imgtriage.predict.base import BasePredictor

_celery = require("celery", "celery")
_signals = require("celery.signals", "celery")

_PREDICTORS: OrderedDict[tuple[str, str], BasePredictor] = OrderedDict()
_LOADS: Counter[tuple[str, str]] = Counter()


def _max_bundles() -> int:
    return max(1, int(os.environ.get("IMGTRIAGE_CELERY_MAX_BUNDLES", "2")))


def get_predictor(bundle: str | os.PathLike[str] | None = None) -> BasePredictor:
    """The process's Predictor for ``bundle`` (default ``IMGTRIAGE_BUNDLE``), loaded on first
    use. The cache is keyed by path and manifest sha256, so a bundle replaced in place is
    reloaded (and its old version dropped); at most ``IMGTRIAGE_CELERY_MAX_BUNDLES`` (2)
    stay loaded.

    Example:
        >>> get_predictor("runs/digits/bundle").classes[:2]  # doctest: +SKIP
        ['0', '1']
    """
    from imgtriage.bundle import load_bundle
    from imgtriage.predict import Predictor

    path = bundle or os.environ.get("IMGTRIAGE_BUNDLE")
    if not path:
        raise ConfigError("no bundle: pass bundle=... to the task or set IMGTRIAGE_BUNDLE in "
                          "the worker's environment")
    resolved = str(Path(path).resolve())
    key = (resolved, load_bundle(resolved, verify=False).sha256)  # the manifest only
    if key in _PREDICTORS:
        _PREDICTORS.move_to_end(key)
        return _PREDICTORS[key]
    threads = os.environ.get("IMGTRIAGE_THREADS")
    predictor = Predictor.load(resolved, backend=os.environ.get("IMGTRIAGE_BACKEND", "auto"),
                               num_threads=int(threads) if threads else None)
    # what runs, in the worker's log (and in every report's meta)
    logging.getLogger("imgtriage.celery").info("loaded %s: %s", resolved,
                                                 predictor.runtime.line())
    for old in [k for k in _PREDICTORS if k[0] == resolved]:  # an older version of it
        del _PREDICTORS[old]
    _PREDICTORS[key] = predictor
    _LOADS[key] += 1
    while len(_PREDICTORS) > _max_bundles():
        _PREDICTORS.popitem(last=False)
    return predictor


@_signals.worker_process_init.connect
def _preload(**_: Any) -> None:
    """Load ``IMGTRIAGE_BUNDLE`` in each new prefork child, before its first task."""
    if os.environ.get("IMGTRIAGE_BUNDLE"):
        get_predictor()


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """JSON gives lists; PredictOptions wants tuples for thresholds."""
    if options.get("thresholds") is not None:
        options = {**options, "thresholds": tuple(options["thresholds"])}
    return options


def _worker_meta() -> dict[str, Any]:
    import socket

    return {"engine": "celery", "worker": {"host": socket.gethostname(), "pid": os.getpid()}}


@_celery.shared_task(name="imgtriage.classify_paths")
def classify_paths(paths: list[str], bundle: str | None = None, batch_size: int | None = None,
                   output: str | None = None, **options: Any) -> dict[str, Any]:
    """Classify files and folders -> the report (``options``: include_probs, topk, tta,
    profile, temperature, thresholds, abstain). With ``output`` (a path on the worker) the
    report is written there in its format and only ``{"meta", "output"}`` comes back, which
    keeps big reports out of the result backend.
    """
    from imgtriage.predict import write_report

    predictor = get_predictor(bundle)
    report = predictor.predict_paths(paths, batch_size=batch_size, **_options(options))
    report["meta"].update(_worker_meta())
    if output is None:
        return report
    write_report(report, output)
    return {"meta": report["meta"], "output": str(output)}


@_celery.shared_task(name="imgtriage.classify_new_files")
def classify_new_files(paths: list[str], store: str, bundle: str | None = None,
                       batch_size: int | None = None, output: str | None = None,
                       **options: Any) -> dict[str, Any]:
    """Classify the files under ``paths`` that the result store ``store`` (a SQLite file on
    the worker) has never seen, keep their rows there, and return their report (or, with
    ``output``, write it there and return ``{"meta", "output"}``). A run cut short by the
    soft time limit keeps its committed rows; the next run reports them. One run per store
    at a time: a second concurrent task fails with ConfigError (route these tasks to one
    queue with one worker, or give each inbox its own store).
    """
    import json

    from imgtriage.predict.runner import run_batch

    predictor = get_predictor(bundle)
    with tempfile.TemporaryDirectory(prefix="imgtriage-celery-") as tmp:
        target = Path(output) if output is not None else Path(tmp) / "report.json"
        run = run_batch(predictor, paths, output=target, store=store, new_only=True,
                        batch_size=batch_size, **_options(options))
        extra = {**_worker_meta(), "n_skipped": run.n_skipped}
        if output is not None:
            meta = {"num_files": run.n_results + run.n_defects, "coverage": run.coverage,
                    "store": str(store), **extra}
            return {"meta": meta, "output": str(output)}
        report = json.loads(target.read_text())
    report["meta"].update(extra)
    return report


@_celery.shared_task(name="imgtriage.worker_info")
def worker_info() -> dict[str, Any]:
    """This worker process: pid, host and the bundles it holds (with how often each was
    loaded: more than once means the process replaced it)."""
    return {**_worker_meta()["worker"],
            "bundles": [{"path": p, "sha256": s, "loads": _LOADS[(p, s)]}
                        for p, s in _PREDICTORS]}
