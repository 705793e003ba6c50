"""imgtriage predict BUNDLE PATHS... --output results.json [--store run.sqlite]
imgtriage report STORE --output results.json"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options
from imgtriage.predict.base import PredictOptions
from imgtriage.predict.run_config import PredictRunConfig, ReportConfig, parse_thresholds

__all__ = ["parse_thresholds", "predict_command", "register", "report_command"]


def predict_command(**kw: Any) -> None:
    """Classify files into a report: every file once, in results or in defects."""
    bundle, paths = kw.pop("bundle"), kw.pop("paths")
    options = {f.name: kw.pop(f.name) for f in fields(PredictOptions) if "help" in f.metadata}
    run = config_from_options(PredictRunConfig, kw)
    if run.engine == "ray":
        _predict_on_ray(bundle, paths, run.output, run.address, run.batch_size, run.thresholds,
                        options, run.expect_sha256)
        return
    from imgtriage.predict.runner import predict_files

    done = predict_files(bundle, paths, run, options, log=typer.echo)
    skipped = f", {done.n_skipped} already in the store" if done.n_skipped else ""
    typer.echo(f"{done.n_results} results, {done.n_defects} defects ({done.n_new} processed "
               f"now{skipped}; {done.files_per_sec:.1f} files/s), coverage {done.coverage} -> "
               f"{run.output}" + (f"; defects -> {run.defect_log}" if run.defect_log else "")
               + f" | {done.runtime}")


# The bundle and the paths, one option per PredictRunConfig field (the run's settings), then
# one per PredictOptions field (thresholds stay text in the run's settings, parsed against the
# bundle's class count).
command(predict_command, arguments=[
    argument("bundle", "Bundle directory or .zip.", Path),
    argument("paths", "Files and/or folders (walked recursively).", list[Path])],
    configs=[PredictRunConfig, PredictOptions], panels={"include_probs": "Decision (per call)"})


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


def report_command(**options: Any) -> None:
    """Rebuild the report of everything a result store holds (no bundle needed)."""
    from imgtriage.predict.runner import report_from_store

    cfg = config_from_options(ReportConfig, options)
    meta = report_from_store(options["store"], cfg.output, defect_log=cfg.defect_log)
    typer.echo(f"{meta['num_files']} files (coverage {meta['coverage']}) -> {cfg.output}")


command(report_command, arguments=[
    argument("store", "A result store written by predict --store.", Path)],
    configs=[ReportConfig])


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
    app.command("report")(report_command)
