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
    """Build a labelled folder, train a calibrated bundle, classify an inbox with broken
    files, junk images and a class never trained on; count what it refuses and why."""
    from imgtriage.demo import run_demo

    r = run_demo(out, dataset=dataset, per_class=per_class, epochs=epochs, quiet=quiet)
    s = r.summary
    why = ", ".join(f"{n} {k}" for k, n in sorted(s["refused_by_reason"].items())) or "none"
    acc = (f"{s['accuracy_on_answered']:.1%} accuracy" if s["accuracy_on_answered"] is not None
           else "none answered")
    typer.echo(f"data:    {r.data_dir}\nbundle:  {r.bundle_path}\nreport:  {r.report_path}\n"
               f"rule:    {s['rule']}\n"
               f"inbox:   {r.n_results} images: answered {s['answered_known']} of the "
               f"trained classes at {acc}; refused (\"unknown\"): known classes "
               f"{s['refused']['known_class']}, never-trained class {s['unseen_class']!r} "
               f"{s['refused']['unseen_class']}, junk (noise/constant/blank) "
               f"{s['refused']['junk']}; why: {why}\n"
               f"defects: {r.n_defects} unreadable files, each with its reason\n"
               f"time:    {r.seconds:.0f}s\nnext:    imgtriage inspect {r.bundle_path}")

def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
