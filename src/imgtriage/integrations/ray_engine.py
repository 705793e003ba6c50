"""Batch classification on a Ray cluster (``imgtriage predict ... --engine ray``).

The same bundle and the same report as the local engine, spread over a cluster::

    driver: list files ──▶ Ray Data blocks of (index, path)
    CPU tasks: decode_batch ──▶ model inputs, or a defect row (one bad file never fails a block)
    actor pool: BatchClassifier (bundle loaded once per actor, one GPU each when the cluster
                has GPUs) ──▶ flat result/defect rows
    driver: rows sorted by index ──▶ the report dict   (or: the cluster writes a Parquet
                                                          dataset directory for huge runs)

Needs ``pip install 'imgtriage[ray]'``. Without an address a local cluster is started (one
CPU per core) and shut down afterwards; with ``address`` the run joins an existing cluster,
whose nodes must all see the files and the bundle at the same paths (a shared mount).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtriage.errors import ConfigError, PredictionError, require

if TYPE_CHECKING:
    from imgtriage.predict.base import BasePredictor, PredictOptions

META_FILE = "_imgtriage_report.json"  # meta + defects, next to a Parquet dataset's files


@dataclass(frozen=True)
class RayConfig:
    """How a Ray run is laid out; ``None`` means "decided from the cluster's resources".

    Attributes:
        address: cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); None
            starts a local cluster with ``num_cpus`` CPUs (default: this machine's cores).
        batch_size: images per model call inside an actor.
        num_actors: model actors; default one per GPU, else ``CPUs // (actor_cpus +
            decode_cpus)`` so decoding keeps a CPU for every actor.
        actor_cpus, decode_cpus: CPUs reserved per model actor and per decode task.
        files_per_block: files per Ray Data block (the unit of decode tasks); default
            4 × batch_size.
        use_gpus: None uses GPUs when the cluster has them; False never; True requires them.
        backend: inference backend inside actors (auto|torch|onnx, as ``--backend``).
        progress: show Ray Data's progress bars.

    Example:
        >>> RayConfig(batch_size=64, num_actors=4).num_actors
        4
    """

    address: str | None = None
    num_cpus: int | None = None
    batch_size: int = 32
    num_actors: int | None = None
    actor_cpus: float = 1.0
    decode_cpus: float = 1.0
    files_per_block: int | None = None
    use_gpus: bool | None = None
    backend: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size} (--batch-size)")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus must be >= 1, got {self.num_cpus}")
        if self.actor_cpus <= 0 or self.decode_cpus <= 0:
            raise ConfigError("actor_cpus and decode_cpus must be > 0")
        if self.files_per_block is not None and self.files_per_block < 1:
            raise ConfigError(f"files_per_block must be >= 1, got {self.files_per_block}")
        if self.backend not in ("auto", "torch", "onnx"):
            raise ConfigError(f"backend must be auto, torch or onnx, got {self.backend!r} "
                              "(--backend)")


@dataclass(frozen=True)
class _Plan:
    cpus: float
    gpus: int
    num_actors: int

    def to_dict(self) -> dict[str, Any]:
        return {"cluster_cpus": self.cpus, "cluster_gpus": self.gpus,
                "num_actors": self.num_actors}


def ray_predict(bundle: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]], *,
                address: str | None = None, batch_size: int = 32,
                dataset_dir: str | os.PathLike[str] | None = None,
                config: RayConfig | None = None, **options: Any) -> dict[str, Any]:
    """Classify files and folders on Ray -> the same report dict as
    ``Predictor.predict_paths`` (``options`` are its options: include_probs, topk, tta,
    profile, temperature, thresholds, abstain). ``config`` wins over ``batch_size``.

    With ``dataset_dir`` (a local folder on shared storage, or a URI pyarrow can write,
    such as ``s3://bucket/run1``) the cluster writes every row into a Parquet dataset there
    instead of sending results back; the returned report then holds the meta (with
    ``results_in``) and the defects, also saved as ``_imgtriage_report.json`` there.

    Example:
        >>> report = ray_predict("runs/digits/bundle", ["photos/"],
        ...                      address="auto", include_probs=True)  # doctest: +SKIP
        >>> report["meta"]["engine"], len(report["results"])  # doctest: +SKIP
        ('ray', 1200)
    """
    from dataclasses import replace

    cfg = config or RayConfig(batch_size=batch_size)
    cfg = replace(cfg, address=address or cfg.address)
    return predict_with_ray(bundle, paths, cfg, options, dataset_dir=dataset_dir)


def _once(files: Iterable[str]) -> list[str]:
    """One entry per file (``dir`` and ``/abs/dir`` name the same ones), first name kept."""
    seen: set[str] = set()
    out = []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def predict_with_ray(bundle: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]],
                     cfg: RayConfig, options: dict[str, Any], *,
                     dataset_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The run behind :func:`ray_predict`, with an explicit :class:`RayConfig`."""
    from imgtriage.predict import Predictor
    from imgtriage.predict.batch import iter_files

    ray = require("ray", "ray")
    require("ray.data", "ray")
    predictor = Predictor.load(bundle, backend=cfg.backend)  # verifies the bundle up front
    opts = predictor.options(**options)
    predictor.policy_for(opts)  # an unknown --profile fails before the cluster starts
    files = _once(iter_files(paths))
    uri = _check_dataset_dir(dataset_dir) if dataset_dir is not None else None
    if not files:
        report = predictor.make_report([], [], 0.0, cfg.batch_size, opts)
        report["meta"].update(engine="ray")
        return report
    started = _connect(ray, cfg)
    try:
        plan = _plan(ray, cfg)
        t0 = time.perf_counter()
        with _data_context(ray, cfg):  # a Dataset keeps the context it was created in
            ds = _pipeline(ray, files, str(Path(bundle).resolve()), predictor, opts, cfg,
                           plan)
            if uri is None:
                results, defects = _collect(ds, len(files))
                report = predictor.make_report(results, defects, time.perf_counter() - t0,
                                               cfg.batch_size, opts)
            else:
                report = _write_dataset(ds, uri, len(files), predictor, opts, cfg, t0)
        report["meta"].update(engine="ray", ray={**plan.to_dict(), "address": cfg.address})
        if uri is not None:
            report["meta"]["results_in"] = uri
            _write_text(uri, META_FILE, json.dumps(report, indent=2))
        return report
    finally:
        if started:
            ray.shutdown()


def _connect(ray: Any, cfg: RayConfig) -> bool:
    """Join ``cfg.address`` or start a local cluster; True when this call started Ray
    (an already initialised Ray, e.g. in a notebook or a test, is used as it is)."""
    if ray.is_initialized():
        return False
    import logging

    kw: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if cfg.address:
        ray.init(address=cfg.address, **kw)
    else:
        ray.init(num_cpus=cfg.num_cpus or os.cpu_count() or 1, include_dashboard=False, **kw)
    return True


def _plan(ray: Any, cfg: RayConfig) -> _Plan:
    """Actors and GPUs from the cluster's resources; refuse layouts that cannot run."""
    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 0))
    gpus = int(res.get("GPU", 0)) if cfg.use_gpus is not False else 0
    if cfg.use_gpus and not gpus:
        raise ConfigError("GPUs were required (use_gpus=True) but the Ray cluster has none")
    if gpus:
        actors = cfg.num_actors or gpus
    else:
        actors = cfg.num_actors or max(1, int(cpus // (cfg.actor_cpus + cfg.decode_cpus)))
    need = actors * cfg.actor_cpus + cfg.decode_cpus
    if need > cpus:
        raise ConfigError(f"{actors} actors x {cfg.actor_cpus:g} CPU + a decode task x "
                          f"{cfg.decode_cpus:g} CPU needs {need:g} CPUs but the cluster has "
                          f"{cpus:g}; lower num_actors, actor_cpus or decode_cpus")
    if gpus and actors > gpus:
        raise ConfigError(f"{actors} actors need one GPU each but the cluster has {gpus}")
    return _Plan(cpus=cpus, gpus=gpus, num_actors=actors)


def _pipeline(ray: Any, files: list[str], bundle: str, predictor: BasePredictor,
              opts: PredictOptions,
              cfg: RayConfig, plan: _Plan) -> Any:
    """The lazy Ray Dataset: listing -> decode tasks -> actor pool -> flat rows."""
    from dataclasses import asdict

    from imgtriage.integrations._ray_blocks import BatchClassifier, decode_batch

    per_block = cfg.files_per_block or 4 * cfg.batch_size
    spec = dict(predictor.bundle.info.preprocess)
    # from_items builds the blocks on the driver (from_arrow would run a remote task per block)
    ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(files)],
                             override_num_blocks=-(-len(files) // per_block))
    # Reserving the memory a decoded block needs is also what keeps Ray Data from fusing
    # decoding into the model actors (it fuses ops with equal resource requests), which
    # would decode inside them and leave the decode CPUs idle.
    ds = ds.map_batches(decode_batch, batch_size=None, batch_format="numpy",
                        num_cpus=cfg.decode_cpus, memory=_decode_memory(spec, per_block),
                        fn_kwargs={"decoder": predictor.decoder, "cwd": os.getcwd()})
    gpu = {"num_gpus": 1} if plan.gpus else {}
    return ds.map_batches(
        BatchClassifier, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors), num_cpus=cfg.actor_cpus,
        fn_constructor_kwargs={"bundle": bundle, "options": asdict(opts),
                               "backend": cfg.backend, "device": "cuda" if plan.gpus else "cpu",
                               "num_threads": max(1, int(cfg.actor_cpus))},
        **gpu)


def _decode_memory(spec: dict[str, Any], per_block: int) -> int:
    """Bytes a decode task holds: its block of float32 inputs twice, plus the decoder."""
    h, w = spec.get("size", (224, 224))
    return 192 * 2**20 + 2 * per_block * int(spec.get("in_chans", 3)) * int(h) * int(w) * 4


@contextmanager
def _data_context(ray: Any, cfg: RayConfig) -> Iterator[None]:
    """Ray Data's progress bars on or off for this run only."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in _QUIET if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, cfg.progress if k != "print_on_execution_start" else False)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


_QUIET = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start",
          "enable_auto_log_stats")


def _collect(ds: Any, n_files: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stream the rows to the driver, restore input order, split results from defects."""
    from imgtriage.integrations._ray_blocks import from_record, row_schema

    pa = require("pyarrow", "ray")
    tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    table = pa.concat_tables(tables) if tables else row_schema().empty_table()
    _check_count(table.num_rows, n_files)
    results, defects = [], []
    for rec in table.sort_by("index").to_pylist():
        kind, item = from_record(rec)
        (results if kind == "result" else defects).append(item)
    return results, defects


def _check_count(n_rows: int, n_files: int) -> None:
    if n_rows != n_files:
        raise PredictionError(f"the Ray run returned {n_rows} rows for {n_files} files; every "
                              "file must appear exactly once (this is a bug: please report it)")


def _check_dataset_dir(path: str | os.PathLike[str]) -> str:
    """A URI for the Parquet dataset; refuse a non-empty folder (runs must not mix)."""
    pafs = require("pyarrow.fs", "ray")
    uri = str(path) if "://" in str(path) else str(Path(path).resolve())
    fs, base = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"{path} is a file; give a folder for the Parquet dataset")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(base)):
        raise ConfigError(f"{path} is not empty; give a new folder for the Parquet dataset so "
                          "two runs never mix")
    return uri


def _write_dataset(ds: Any, uri: str, n_files: int, predictor: BasePredictor,
                   opts: PredictOptions, cfg: RayConfig, t0: float) -> dict[str, Any]:
    """Workers write the rows as Parquet; the driver reads back only counts and defects."""
    from imgtriage.integrations._ray_blocks import from_record

    pads = require("pyarrow.dataset", "ray")
    pc = require("pyarrow.compute", "ray")
    ds.write_parquet(uri)
    data = pads.dataset(uri, format="parquet")  # skips _imgtriage_report.json ("_" prefix)
    t = data.to_table(columns=["kind", "abstained"])
    n_results = int(pc.sum(pc.equal(t["kind"], "result")).as_py() or 0)
    n_abstained = int(pc.sum(pc.fill_null(t["abstained"], False)).as_py() or 0)
    _check_count(t.num_rows, n_files)
    bad = data.to_table(filter=pc.field("kind") == "defect").sort_by("index")
    defects = [from_record(rec)[1] for rec in bad.to_pylist()]
    report = predictor.make_report([], defects, time.perf_counter() - t0, cfg.batch_size, opts)
    report["meta"].update(num_files=n_results + len(defects), n_results=n_results,
                          coverage=round(1 - n_abstained / n_results, 6) if n_results else None)
    if isinstance(report["meta"].get("cascade"), dict):  # rows hold "stage" in "extra" JSON
        from imgtriage.predict.report import stage_counts

        extra = data.to_table(columns=["extra"], filter=pc.field("kind") == "result")["extra"]
        def count(text: str) -> int:
            return int(pc.sum(pc.fill_null(pc.match_substring(extra, text), False)).as_py()
                       or 0)

        n1, n2 = count('"stage": 1'), count('"stage": 2')
        ood = count('"stage1_ood": true') \
            if report["meta"]["cascade"].get("ood_gate") is not None else None
        report["meta"]["cascade"] = {**report["meta"]["cascade"], **stage_counts(n1, n2, ood)}
    return report


def _write_text(uri: str, name: str, text: str) -> None:
    pafs = require("pyarrow.fs", "ray")
    fs, base = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(f"{base.rstrip('/')}/{name}") as fh:
        fh.write(text.encode())
