"""imgtriage cascade STAGE2_BUNDLE DATA --out CASCADE_BUNDLE: one option per CascadeConfig
field (its help text lives with the field), plus the feature spec and thread count."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import config_from_options, config_parameters
from imgtriage.predict.cascade import CascadeConfig


def cascade_command(**options: Any) -> None:
    """Build a two-stage cascade: a cheap first stage answers what it is sure of."""
    from imgtriage.data.features import FeatureSpec
    from imgtriage.predict.cascade import build_cascade

    stage2, data, out = options.pop("stage2"), options.pop("data"), options.pop("out")
    threads = options.pop("threads")
    feature_channels, feature_max_side = options.pop("feature_channels"), \
        options.pop("feature_max_side")
    if threads:
        import torch

        torch.set_num_threads(threads)
    features = None
    if feature_channels is not None or feature_max_side != 64:
        from imgtriage.bundle import load_bundle

        in_chans = load_bundle(stage2).info.model.in_chans
        features = FeatureSpec(channels=feature_channels or (3 if in_chans == 3 else 1),
                               max_side=feature_max_side)
    cfg = config_from_options(CascadeConfig, options, features=features)
    always_second_stage = cfg.always_second_stage
    res = build_cascade(stage2, data, out, cfg)
    v = res.validation
    acc = v["accepted_accuracy"]
    typer.echo(f"cascade: {res.bundle_path} ({res.seconds:.1f}s)\n"
               f"validation ({v['n']} images): gate {v['threshold']}, first stage answers "
               f"{v['accepted_share']:.1%} at accuracy "
               f"{'n/a' if acc is None else f'{acc:.4f}'}; cascade accuracy "
               f"{v['cascade_accuracy']:.4f} vs stage 2 alone {v['stage2_accuracy']:.4f}"
               + (f"; {v['routed_by_class']} routed by class" if always_second_stage else ""))


_KW = inspect.Parameter.KEYWORD_ONLY
# One option per CascadeConfig field (help in the field's metadata), plus the command's own.
cascade_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("stage2", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="The second-stage (CNN) classifier "
                                                       "bundle.")),
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="The labelled data stage 2 was trained "
                                                       "on (class folders or a CSV/JSONL "
                                                       "manifest).")),
    inspect.Parameter("out", _KW, annotation=Path, default=typer.Option(
        ..., "--out", "-o", help="Cascade bundle to write (a directory, or a .zip).")),
    *config_parameters(CascadeConfig),
    inspect.Parameter("feature_channels", _KW, annotation=int | None, default=typer.Option(
        None, help="Channels of the per-channel statistics (default 3 for an RGB stage 2, "
                   "else 1).")),
    inspect.Parameter("feature_max_side", _KW, annotation=int, default=typer.Option(
        64, help="Statistics use every s-th pixel so no side exceeds this.")),
    inspect.Parameter("threads", _KW, annotation=int | None, default=typer.Option(
        None, help="Compute threads."))])


def register(app: typer.Typer) -> None:
    app.command("cascade")(cascade_command)
