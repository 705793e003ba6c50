"""imgtriage demo"""

from __future__ import annotations

from pathlib import Path

import typer


def demo_command(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o",
                             help="Where the demo writes its data, run, bundle and report."),
    dataset: str = typer.Option("auto", help="auto (Fashion-MNIST from Debian's "
                                             "dataset-fashion-mnist when installed, else "
                                             "scikit-learn digits), digits or fashion-mnist."),
    per_class: int = typer.Option(400, help="Training images per class."),
    epochs: int = typer.Option(6, help="Training epochs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Build a labelled folder, train, save a bundle, classify an inbox with broken files."""
    from imgtriage.demo import run_demo

    r = run_demo(out, dataset=dataset, per_class=per_class, epochs=epochs, quiet=quiet)
    typer.echo(f"data:    {r.data_dir}\nbundle:  {r.bundle_path}\nreport:  {r.report_path}\n"
               f"inbox:   {r.n_results} classified (accuracy {r.accuracy:.1%}), "
               f"{r.n_defects} defects with reasons\ntime:    {r.seconds:.0f}s\n"
               f"next:    imgtriage inspect {r.bundle_path}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
