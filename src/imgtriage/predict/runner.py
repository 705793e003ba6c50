"""Large batch runs: stream files through a Predictor into a result store, then write reports.

This is what ``imgtriage predict`` calls. Every row goes to a SQLite store as it is produced
(the ``--store`` file, or a temporary one), and the report is written from the store at the
end, streamed: memory does not grow with the number of files, a killed run resumes where it
stopped, and every file ends up exactly once in results or defects.

Example:
    >>> p = Predictor.load("bundle")  # doctest: +SKIP
    >>> run = run_batch(p, ["inbox/"], output="out.parquet", store="inbox.sqlite")  # doctest: +SKIP
    >>> run.n_new, run.n_skipped  # doctest: +SKIP
    (1200, 0)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError
from imgtriage.predict.base import BasePredictor, PredictOptions
from imgtriage.predict.batch import iter_predictions
from imgtriage.predict.progress import RunProgress
from imgtriage.predict.report import stage_counts
from imgtriage.predict.run_config import PredictRunConfig, parse_thresholds
from imgtriage.predict.sinks import FORMATS, write_defect_log, write_stream
from imgtriage.predict.store import ResultStore

# Meta keys that decide what a row says: a store refuses rows made under other values.
IDENTITY_KEYS = ("bundle_sha256", "temperature", "thresholds", "abstain", "unknown_label",
                 "profile", "tta")


@dataclass(frozen=True)
class BatchRun:
    """What a run did. ``n_results``/``n_defects`` count the written report's rows."""

    output: Path | None
    store: Path | None
    n_results: int
    n_defects: int
    n_new: int  # files classified (or found defective) by this run
    n_skipped: int  # files the store already held
    coverage: float | None
    seconds: float
    runtime: str = ""  # the model's runtime line (backend, precision, threads), when known

    @property
    def files_per_sec(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else 0.0


def _check_paths(output: Path | None, defect_log: Path | None, store: Path | None,
                 new_only: bool) -> None:
    """Fail before a long run, not after it."""
    if output is not None and output.suffix.lower() not in FORMATS:
        raise ConfigError(f"unknown report format {output.suffix!r} for {output}; use one of "
                          f"{', '.join(FORMATS)} (--output)")
    if defect_log is not None and defect_log.suffix.lower() not in (".json", ".jsonl"):
        raise ConfigError(f"the defect log must be .json or .jsonl, got {defect_log} "
                          "(--defect-log)")
    if new_only and store is None:
        raise ConfigError("--new-only compares against a result store: give --store FILE")
    for path, flag in ((output, "--output"), (defect_log, "--defect-log")):
        if path is not None and (path.is_dir() or (path.exists() and not path.is_file())):
            raise ConfigError(f"{path} exists and is not a regular file; give {flag} a file "
                              "path (the report replaces a file, never a folder or a pipe)")
    if store is not None and output is not None and output.resolve() == store.resolve():
        raise ConfigError(f"--output and --store are the same file ({output}); give each "
                          "its own path")


def identity_of(meta: dict[str, Any], opts: PredictOptions) -> dict[str, Any]:
    """What must match for rows to be mixed in one store: bundle, decision rule, row format."""
    ident = {k: meta.get(k) for k in IDENTITY_KEYS}
    ident.update(include_probs=opts.include_probs, topk=opts.topk)
    return ident


def run_batch(predictor: BasePredictor, paths: Iterable[str | os.PathLike[str]], *,
              output: str | os.PathLike[str] | None = None,
              store: str | os.PathLike[str] | None = None, new_only: bool = False,
              defect_log: str | os.PathLike[str] | None = None, batch_size: int | None = None,
              workers: int | None = None, progress: bool = False, executor: str = "thread",
              prefetch: int = 2, opts: PredictOptions | None = None,
              **options: Any) -> BatchRun:
    """Classify ``paths`` into ``store`` and write ``output`` (+ ``defect_log``) from it.

    With a ``store`` that already holds files, those with the same path, size and mtime are
    skipped (resume); ``new_only`` skips every path the store has seen and writes only this
    run's rows (plus rows of an earlier run that died before writing its report).
    Without ``store``, a temporary one is used and removed.
    """
    opts = predictor.options(opts, **options)
    paths = list(paths)
    output_p = Path(output) if output is not None else None
    log_p = Path(defect_log) if defect_log is not None else None
    store_p = Path(store) if store is not None else None
    _check_paths(output_p, log_p, store_p, new_only)
    batch_size = batch_size or predictor.batch_size
    meta = predictor.make_report([], [], 0.0, batch_size, opts)["meta"]
    tmpdir = None if store_p else Path(tempfile.mkdtemp(prefix="imgtriage-run-"))
    db = store_p or Path(tmpdir or ".") / "results.sqlite"
    t0 = time.perf_counter()
    try:
        # a throw-away store (no --store) needs no crash safety: no WAL, no syncs
        with ResultStore.open(db, identity=identity_of(meta, opts), meta=meta,
                              durable=store_p is not None) as rs:
            run_id = rs.begin_run(str(meta.get("backend", "")))
            bar = RunProgress(paths, enabled=progress)
            skip = rs.skip_seen if new_only else rs.skip_done
            for kind, item in iter_predictions(predictor, paths, batch_size=batch_size,
                                               opts=opts, workers=workers, progress=bar,
                                               skip=skip, executor=executor,
                                               prefetch=prefetch):
                rs.add(kind, item)
            rs.commit()
            scope = run_id if new_only else None
            out_meta = write_outputs(rs, output_p, log_p, run_id=scope)
            rs.mark_delivered()
            return BatchRun(output_p, store_p, rs.count("result", scope),
                            rs.count("defect", scope), bar.classified, bar.skipped_count,
                            out_meta["coverage"], time.perf_counter() - t0)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def predict_files(bundle: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]],
                  run: PredictRunConfig | None = None,
                  opts: PredictOptions | dict[str, Any] | None = None, *,
                  log: Callable[[str], None] | None = None) -> BatchRun:
    """What ``imgtriage predict`` does on this machine: load ``bundle`` as ``run`` says
    (backend, precision, threads, decode budget, feature manifest), classify ``paths`` into
    its report/store/defect log, with the decision options ``opts`` (the kind's own options
type is built from them). ``log`` gets the
    runtime line before the run. (``engine="ray"`` runs through
    ``imgtriage.integrations.ray_engine.ray_predict`` instead.)

    Example:
        >>> cfg = PredictRunConfig(output="out.csv", store="run.sqlite")
        >>> predict_files("runs/a/bundle", ["photos/"], cfg).n_results  # doctest: +SKIP
        40
    """
    from imgtriage.predict.limits import with_read_limits
    from imgtriage.predict.predictor import Predictor

    cfg = run or PredictRunConfig()
    if cfg.engine != "local":
        raise ConfigError(f"predict_files runs on this machine; engine {cfg.engine!r} runs "
                          "through imgtriage.integrations (imgtriage predict --engine ray)")
    _check_paths(cfg.output, cfg.defect_log, cfg.store, cfg.new_only)  # before the model loads
    predictor = Predictor.load(bundle, backend=cfg.backend, device=cfg.device,
                               num_threads=cfg.threads, precision=cfg.precision,
                               expect_sha256=cfg.expect_sha256)
    predictor = with_read_limits(predictor, **cfg.read_limits())
    runtime = predictor.runtime.line()
    (log or (lambda _m: None))(f"predict: {runtime}")
    given = dict(opts or {}) if not is_dataclass(opts) else \
        {f.name: getattr(opts, f.name) for f in fields(opts)}
    if cfg.thresholds is not None:
        given["thresholds"] = parse_thresholds(cfg.thresholds, len(predictor.classes))
    if cfg.feature_manifest is not None:
        predictor.use_feature_manifest(cfg.feature_manifest)
    done = run_batch(predictor, paths, output=cfg.output, store=cfg.store,
                     new_only=cfg.new_only, defect_log=cfg.defect_log,
                     batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress,
                     executor=cfg.executor, opts=predictor.options(None, **given))
    return replace(done, runtime=runtime)


def store_meta(store: ResultStore, run_id: int | None = None) -> dict[str, Any]:
    """The report's ``meta`` for what the store holds (all of it, or one run's rows)."""
    meta = dict(store.info("meta") or {})
    n_results = store.count("result", run_id)
    n_abstained = store.n_abstained(run_id)
    meta.update(timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
                num_files=store.count(None, run_id),
                coverage=round(1 - n_abstained / n_results, 6) if n_results else None,
                elapsed_sec=round(store.elapsed(run_id), 3), store=str(store.path))
    if isinstance(meta.get("cascade"), dict):  # built before any row: count the stages now
        stages = store.value_counts("stage", run_id)
        ood = sum(n for v, n in store.value_counts("stage1_ood", run_id).items() if v) \
            if meta["cascade"].get("ood_gate") is not None else None
        meta["cascade"] = {**meta["cascade"], **stage_counts(stages.get(1, 0), stages.get(2, 0),
                                                             ood)}
    return meta


def write_outputs(store: ResultStore, output: Path | None, defect_log: Path | None, *,
                  run_id: int | None = None) -> dict[str, Any]:
    """Write the report (any format) and the defect log from a store, streamed."""
    meta = store_meta(store, run_id)
    if output is not None:
        write_stream(output, meta, lambda: store.iter_items("result", run_id),
                     lambda: store.iter_items("defect", run_id), store.extra_keys(run_id))
    if defect_log is not None:
        write_defect_log(defect_log, store.iter_items("defect", run_id))
    return meta


def report_from_store(store: str | os.PathLike[str], output: str | os.PathLike[str], *,
                      defect_log: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Rebuild the report (and optionally the defect log) from a store; returns its meta.

    Example:
        >>> report_from_store("inbox.sqlite", "inbox.json")["num_files"]  # doctest: +SKIP
        1200
    """
    path = Path(store)
    if not path.is_file():
        raise ConfigError(f"result store {path} does not exist; give the file a run wrote "
                          "with --store")
    out = Path(output)
    log = Path(defect_log) if defect_log is not None else None
    _check_paths(out, log, path, False)
    with ResultStore.open(path) as rs:
        if rs.info("meta") is None:
            raise ConfigError(f"{path} holds no run yet; run `imgtriage predict ... --store "
                              f"{path}` first")
        return write_outputs(rs, out, log)

