"""imgtriage export BUNDLE --onnx [--quantize static --calib DIR]: one option per
ExportConfig field (its help text lives with the field), plus the format flag."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import config_from_options, config_parameters
from imgtriage.predict.export_config import ExportConfig


def export_command(**options: Any) -> None:
    """Export the model for ONNX Runtime (the default CPU backend once a graph is present)."""
    from imgtriage.errors import ConfigError
    from imgtriage.predict.export import export_onnx

    bundle, onnx = options.pop("bundle"), options.pop("onnx")
    if not onnx:
        raise ConfigError("choose what to export: --onnx (the only format so far)")
    res = export_onnx(bundle, config_from_options(ExportConfig, options), log=typer.echo)
    typer.echo(f"bundle: {res.bundle_path} (default precision {res.precision}, "
               f"{res.seconds:.0f}s)")


_KW = inspect.Parameter.KEYWORD_ONLY
# The bundle and the format flag, then one option per ExportConfig field.
export_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("bundle", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Bundle directory or .zip.")),
    inspect.Parameter("onnx", _KW, annotation=bool, default=typer.Option(
        False, "--onnx", help="Write model.onnx (dynamic batch axis) into a new version of "
                              "the bundle.")),
    *config_parameters(ExportConfig)])


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
