"""imgtriage demo: one option per DemoConfig field (``cli/_options.py``)."""

from __future__ import annotations

from typing import Any

import typer

from imgtriage.cli._options import command, config_from_options
from imgtriage.demo import DemoConfig


def demo_command(**options: Any) -> None:
    """Build a labelled folder, train a calibrated bundle, classify an inbox with broken
    files, junk images and a class never trained on; count what it refuses and why."""
    from imgtriage.demo import run_demo

    cfg = config_from_options(DemoConfig, options)
    r = run_demo(cfg.out, dataset=cfg.dataset, per_class=cfg.per_class, epochs=cfg.epochs,
                 quiet=cfg.quiet)
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


command(demo_command, configs=[DemoConfig])


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
