"""imgtriage export BUNDLE --onnx [--quantize static --calib DIR]: one option per
ExportFormat and ExportConfig field (its help text lives with the field)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options
from imgtriage.predict.export_config import ExportConfig, ExportFormat


def export_command(**options: Any) -> None:
    """Export the model for ONNX Runtime (the default CPU backend once a graph is present)."""
    from imgtriage.errors import ConfigError
    from imgtriage.predict.export import export_onnx

    bundle = options["bundle"]
    if not config_from_options(ExportFormat, options).onnx:
        raise ConfigError("choose what to export: --onnx (the only format so far)")
    res = export_onnx(bundle, config_from_options(ExportConfig, options), log=typer.echo)
    typer.echo(f"bundle: {res.bundle_path} (default precision {res.precision}, "
               f"{res.seconds:.0f}s)")


# The bundle and the format flag, then one option per ExportConfig field.
command(export_command, arguments=[argument("bundle", "Bundle directory or .zip.", Path)],
        configs=[ExportFormat, ExportConfig])


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
