"""imgtriage cascade STAGE2_BUNDLE DATA --out CASCADE_BUNDLE: one option per field of
CascadeRunOptions (where it goes, the feature statistics, threads) and CascadeConfig (their
help text lives with the fields)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options
from imgtriage.predict.cascade import CascadeConfig, CascadeRunOptions


def cascade_command(**options: Any) -> None:
    """Build a two-stage cascade: a cheap first stage answers what it is sure of."""
    from imgtriage.predict.cascade import build_cascade

    stage2, data = options["stage2"], options["data"]
    run = config_from_options(CascadeRunOptions, options)
    if run.threads:
        import torch

        torch.set_num_threads(run.threads)
    cfg = config_from_options(CascadeConfig, options, features=run.feature_spec(stage2))
    res = build_cascade(stage2, data, run.out, cfg)
    v = res.validation
    acc = v["accepted_accuracy"]
    typer.echo(f"cascade: {res.bundle_path} ({res.seconds:.1f}s)\n"
               f"validation ({v['n']} images): gate {v['threshold']}, first stage answers "
               f"{v['accepted_share']:.1%} at accuracy "
               f"{'n/a' if acc is None else f'{acc:.4f}'}; cascade accuracy "
               f"{v['cascade_accuracy']:.4f} vs stage 2 alone {v['stage2_accuracy']:.4f}"
               + (f"; {v['routed_by_class']} routed by class" if cfg.always_second_stage
                  else ""))
    typer.echo(ood_gate_line(v))


def ood_gate_line(v: dict[str, Any]) -> str:
    """What the first stage's OOD gate does, from the cascade's validation record."""
    g = v.get("ood_gate")
    if g is None:
        return f"OOD gate: none ({v.get('no_ood_gate', 'built before the gate')}): the first " \
               "stage answers any input it is confident about"
    level = g.get("guaranteed_acceptance")
    return (f"OOD gate: {g['in_distribution_share']:.1%} of validation images look like the "
            f"training data; the other {g['stage1_ood']} go to stage 2 (it answers or refuses "
            "them)" + (f"; new in-distribution images pass with probability >= {level:.1%}"
                       if level else ""))


# The two inputs, then one option per CascadeRunOptions and CascadeConfig field.
command(cascade_command, arguments=[
    argument("stage2", "The second-stage (CNN) classifier bundle.", Path),
    argument("data", "The labelled data stage 2 was trained on (class folders or a CSV/JSONL "
                     "manifest).", Path)], configs=[CascadeRunOptions, CascadeConfig])


def register(app: typer.Typer) -> None:
    app.command("cascade")(cascade_command)
