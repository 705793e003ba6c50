"""imgtriage predict BUNDLE PATHS... --output results.json [--store run.sqlite]
imgtriage report STORE --output results.json"""

from __future__ import annotations

import inspect
import typing
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer

from imgtriage.cli._options import config_parameters
from imgtriage.predict.base import PredictOptions


def parse_thresholds(text: str | None, n_classes: int) -> tuple[float, ...] | None:
    """``"0.6"`` (every class) or ``"0.5,0.7,0.6"`` (one per class, in the bundle's order).

    Example:
        >>> parse_thresholds("0.6", 3)
        (0.6, 0.6, 0.6)
    """
    from imgtriage.errors import ConfigError

    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--thresholds takes numbers separated by commas, got {text!r}") from None
    if len(values) == 1:
        return values * n_classes
    if len(values) != n_classes:
        raise ConfigError(f"--thresholds has {len(values)} values for {n_classes} classes; give "
                          "one value for all classes or one per class")
    return values


def _run_options(
    bundle: Path = typer.Argument(..., help="Bundle directory or .zip."),
    paths: list[Path] = typer.Argument(..., help="Files and/or folders (walked recursively)."),
    output: Path = typer.Option(Path("results.json"), "--output", "-o",
                                help="Report file: .json, .jsonl, .csv or .parquet."),
    store: Path = typer.Option(None, "--store", help="SQLite result store: every row is kept "
                               "as it is produced; run again with the same store to resume "
                               "(files with the same path, size and mtime are skipped)."),
    new_only: bool = typer.Option(False, "--new-only", help="Classify only files the store "
                                  "has never seen, and report only those (needs --store)."),
    defect_log: Path = typer.Option(None, "--defect-log", help="Also write the defects alone "
                                    "to this .json (or .jsonl) file."),
    batch_size: int = typer.Option(None, help="Images per inference batch (default: what "
                                              "the backend runs best: 16 ONNX, 32 torch)."),
    thresholds: str = typer.Option(None, help="Override the per-class thresholds: one value "
                                              "for all, or comma-separated in class order."),
    backend: str = typer.Option("auto", help="auto (ONNX Runtime when the bundle has a "
                                             "graph), torch or onnx."),
    precision: str = typer.Option(None, help="fp32 or int8 ONNX graph (default: the "
                                             "bundle's: int8 only where its check accepted "
                                             "it)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0."),
    workers: int = typer.Option(None, help="Decoding workers (default: one per core, >= 2)."),
    executor: str = typer.Option("thread", help="Decoding workers are threads or processes."),
    threads: int = typer.Option(None, help="Compute threads for the model (default: cores)."),
    progress: bool = typer.Option(True, help="Show a live progress line."),
    engine: str = typer.Option("local", help="local (this machine) or ray (a Ray cluster; "
                                             "needs imgtriage[ray])."),
    address: str = typer.Option(None, help="Ray cluster address for --engine ray "
                                           "(default: start a local one)."),
    expect_sha256: str = typer.Option(None, "--expect-sha256", help="Refuse any bundle but "
                                      "the one with this sha256 (imgtriage inspect prints "
                                      "it): pins a deployment to a bundle."),
    max_pixels: int = typer.Option(None, "--max-pixels", help="Decode budget: pixels per "
                                   "image (default: the bundle's, 100M)."),
    max_decoded_bytes: int = typer.Option(None, "--max-decoded-bytes", help="Decode budget: "
                                          "bytes one file may take once decoded (default: "
                                          "the bundle's, 64 MiB)."),
    max_pages: int = typer.Option(None, "--max-pages", help="Decode budget: pages, planes "
                                  "or HDUs one file may need (default: the bundle's, 256)."),
    decode_timeout: float = typer.Option(None, "--decode-timeout", help="Decode budget: "
                                         "seconds one file may take to decode (default: "
                                         "the bundle's, 30)."),
    feature_manifest: Path = typer.Option(None, "--feature-manifest", help="Image + feature "
                                          "bundles trained with --feature-columns: a CSV/JSONL "
                                          "with path and those columns for the files (files "
                                          "not listed get them imputed and flagged)."),
) -> None:
    """The options of ``imgtriage predict`` that are not per-call decision options."""


def predict_command(**kw: Any) -> None:
    """Classify files into a report: every file once, in results or in defects."""
    from imgtriage.errors import ConfigError
    from imgtriage.predict import Predictor

    options = {f.name: kw.pop(f.name) for f in fields(PredictOptions) if "help" in f.metadata}
    o = SimpleNamespace(**kw)  # the run's own options, by name
    if o.engine == "ray":
        _predict_on_ray(o.bundle, o.paths, o.output, o.address, o.batch_size, o.thresholds,
                        options, o.expect_sha256)
        return
    if o.engine != "local":
        raise ConfigError(f"engine must be local or ray, got {o.engine!r} (--engine)")
    from imgtriage.predict.limits import with_read_limits
    from imgtriage.predict.runner import run_batch

    predictor = Predictor.load(o.bundle, backend=o.backend, device=o.device,
                               num_threads=o.threads, precision=o.precision,
                               expect_sha256=o.expect_sha256)
    predictor = with_read_limits(predictor, max_pixels=o.max_pixels,
                                 max_decoded_bytes=o.max_decoded_bytes, max_pages=o.max_pages,
                                 decode_timeout_s=o.decode_timeout)
    runtime = predictor.runtime.line()
    typer.echo(f"predict: {runtime}")
    options["thresholds"] = parse_thresholds(o.thresholds, len(predictor.classes))
    if o.feature_manifest is not None:
        predictor.use_feature_manifest(o.feature_manifest)
    run = run_batch(predictor, o.paths, output=o.output, store=o.store, new_only=o.new_only,
                    defect_log=o.defect_log, batch_size=o.batch_size, workers=o.workers,
                    progress=o.progress, executor=o.executor, **options)
    done = f", {run.n_skipped} already in the store" if run.n_skipped else ""
    typer.echo(f"{run.n_results} results, {run.n_defects} defects ({run.n_new} processed now"
               f"{done}; {run.files_per_sec:.1f} files/s), coverage {run.coverage} -> {o.output}"
               + (f"; defects -> {o.defect_log}" if o.defect_log else "") + f" | {runtime}")


# The run's own options, then one option per PredictOptions field (help with each field;
# thresholds stay text, parsed against the bundle's class count).
_HINTS = typing.get_type_hints(_run_options)
predict_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    *(p.replace(annotation=_HINTS[p.name])
      for p in inspect.signature(_run_options).parameters.values()),
    *config_parameters(PredictOptions, panels={"include_probs": "Decision (per call)"})])


def _predict_on_ray(bundle: Path, paths: list[Path], output: Path, address: str | None,
                    batch_size: int | None, thresholds: str | None, options: dict,
                    expect_sha256: str | None = None) -> None:
    from dataclasses import replace

    from imgtriage.bundle import load_bundle
    from imgtriage.integrations.ray_engine import ray_predict
    from imgtriage.predict import write_report
    from imgtriage.predict.backends import choose_runtime
    from imgtriage.predict.report import check_output_path

    check_output_path(output)
    b = load_bundle(bundle, verify=False, expect_sha256=expect_sha256)
    # what each actor loads; its threads are the actor's own share of its node's cores
    runtime = replace(choose_runtime(b), threads=None).line()
    typer.echo(f"predict (ray): {runtime}")
    if thresholds is not None:
        options["thresholds"] = parse_thresholds(thresholds, len(b.classes))
    report = ray_predict(bundle, paths, address=address, batch_size=batch_size or 32,
                         **{k: v for k, v in options.items() if v is not None})
    write_report(report, output)
    typer.echo(f"{len(report['results'])} results, {len(report['defects'])} defects "
               f"-> {output} | {runtime}")


def report_command(
    store: Path = typer.Argument(..., help="A result store written by predict --store."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="Report file: .json, .jsonl, .csv or .parquet."),
    defect_log: Path = typer.Option(None, "--defect-log",
                                    help="Also write the defects alone (.json or .jsonl)."),
) -> None:
    """Rebuild the report of everything a result store holds (no bundle needed)."""
    from imgtriage.predict.runner import report_from_store

    meta = report_from_store(store, output, defect_log=defect_log)
    typer.echo(f"{meta['num_files']} files (coverage {meta['coverage']}) -> {output}")


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
    app.command("report")(report_command)
