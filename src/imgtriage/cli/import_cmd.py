"""imgtriage import MODEL --out BUNDLE --classes ... --preprocess ...: one option per
ImportConfig field (generated, as `imgtriage train` is from TrainConfig)."""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import typer

from imgtriage.errors import ConfigError
from imgtriage.predict.importing import ImportConfig

_TUPLES = {"classes": str, "mean": float, "std": float}  # comma-separated on the command line


def _parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(ImportConfig)
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                          default=typer.Argument(..., help="An .onnx file, or a state_dict/"
                                                 "checkpoint (.pth .pt .bin .ckpt "
                                                 ".safetensors) with --arch.")),
        inspect.Parameter("out", kw, annotation=Path, default=typer.Option(
            ..., "--out", "-o", help="Bundle directory to write (or .zip)."))]
    for f in fields(ImportConfig):
        hint = hints[f.name]
        if f.name in _TUPLES:
            annotation, default = str | None, None
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            annotation = (args[0] | None) if args else hint
            default = None if f.default is MISSING else f.default
        params.append(inspect.Parameter(f.name, kw, annotation=annotation, default=typer.Option(
            default, "--" + f.name.replace("_", "-"), help=f.metadata["help"])))
    return params


def _split(name: str, text: str | None) -> tuple[Any, ...] | None:
    if text is None:
        return None
    if name == "classes" and Path(text).is_file():
        return tuple(line.strip() for line in Path(text).read_text().splitlines()
                     if line.strip())
    try:
        return tuple(_TUPLES[name](v.strip()) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"--{name} takes comma-separated numbers, got {text!r}") from exc


def import_command(**options: Any) -> None:
    """Wrap a model trained elsewhere (ONNX, or a torchvision/timm state_dict) into a bundle
    with its preprocessing declared by name; checks parity on sample images when given."""
    from imgtriage.predict.importing import import_model

    model, out = options.pop("model"), options.pop("out")
    for name in _TUPLES:
        options[name] = _split(name, options[name])
    options["classes"] = options["classes"] or ()
    res = import_model(model, out, ImportConfig(**options))
    pre = res.preprocess
    typer.echo(f"imported {model.name} ({res.source_format}) with {options['preprocess']} "
               f"preprocessing: {pre['channel_order']}, x{pre['value_range']:g}, mean "
               f"{pre['mean']}, std {pre['std']}, {pre['size'][0]}x{pre['size'][1]}")
    if res.graph_parity is not None:
        typer.echo(f"wrapped onnx graph vs original: max |Δp| {res.graph_parity:.1e}")
    if res.parity is not None:
        typer.echo(f"parity on {res.parity['n_images']} images: max |Δp| "
                   f"{res.parity['max_abs_dprob']:.1e} (tolerance {res.parity['tolerance']})")
    typer.echo(f"bundle: {res.bundle_path}")


import_command.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
