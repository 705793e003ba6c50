"""imgtriage predict BUNDLE PATHS... --output results.json"""

from __future__ import annotations

from pathlib import Path

import typer


def predict_command(
    bundle: Path = typer.Argument(..., help="Bundle directory or .zip."),
    paths: list[Path] = typer.Argument(..., help="Files and/or folders (walked recursively)."),
    output: Path = typer.Option(Path("results.json"), "--output", "-o",
                                help="Report file: .json, .jsonl, .csv or .parquet."),
    batch_size: int = typer.Option(32, help="Images per inference batch."),
    include_probs: bool = typer.Option(False, "--include-probs",
                                       help="Add every class probability to each result."),
    topk: int = typer.Option(None, help="Add the top-k classes with scores to each result."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation with the bundle's "
                                                  "flip/rotation policy."),
    profile: str = typer.Option(None, help="A decision profile saved in the bundle "
                                           "(e.g. precision, recall)."),
    temperature: float = typer.Option(None, help="Override the bundle's temperature."),
    backend: str = typer.Option("auto", help="auto (ONNX Runtime when the bundle has a "
                                             "graph), torch or onnx."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda:0."),
    workers: int = typer.Option(None, help="Decoding threads (default: up to 4)."),
    threads: int = typer.Option(None, help="Compute threads for the model."),
    progress: bool = typer.Option(True, help="Show a live progress line."),
    engine: str = typer.Option("local", help="local (this machine) or ray (a Ray cluster; "
                                             "needs imgtriage[ray])."),
    address: str = typer.Option(None, help="Ray cluster address for --engine ray "
                                           "(default: start a local one)."),
) -> None:
    """Classify files into a report: every file once, in results or in defects."""
    from imgtriage.predict import Predictor, write_report
    from imgtriage.predict.report import check_output_path

    check_output_path(output)
    if engine == "ray":
        from imgtriage.integrations.ray_engine import ray_predict

        report = ray_predict(bundle, paths, address=address, batch_size=batch_size,
                             include_probs=include_probs, topk=topk, tta=tta,
                             profile=profile, temperature=temperature)
        write_report(report, output)
        typer.echo(f"{len(report['results'])} results, {len(report['defects'])} defects "
                   f"-> {output}")
        return
    if engine != "local":
        from imgtriage.errors import ConfigError

        raise ConfigError(f"engine must be local or ray, got {engine!r} (--engine)")
    predictor = Predictor.load(bundle, backend=backend, device=device, num_threads=threads)
    report = predictor.predict_paths(paths, batch_size=batch_size, workers=workers,
                                     progress=progress, include_probs=include_probs,
                                     topk=topk, tta=tta, profile=profile,
                                     temperature=temperature)
    write_report(report, output)
    meta = report["meta"]
    typer.echo(f"{len(report['results'])} results, {len(report['defects'])} defects, "
               f"coverage {meta['coverage']}, {meta['elapsed_sec']}s -> {output}")


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
