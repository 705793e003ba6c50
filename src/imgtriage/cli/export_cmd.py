"""imgtriage export BUNDLE --onnx [--quantize static --calib DIR]"""

from __future__ import annotations

from pathlib import Path

import typer


def export_command(
    bundle: Path = typer.Argument(..., help="Bundle directory or .zip."),
    onnx: bool = typer.Option(False, "--onnx", help="Write model.onnx (dynamic batch axis) "
                                                    "into a new version of the bundle."),
    quantize: str = typer.Option(None, help="Also write an int8 graph: static (QDQ, "
                                            "per-channel, calibrated on --calib; ~2x faster "
                                            "for CNNs) or dynamic (slower for CNNs)."),
    calib: Path = typer.Option(None, help="Folder of real images to calibrate int8 on and to "
                                          "check it against fp32 (class folders named like "
                                          "the bundle's classes also give accuracy)."),
    calib_images: int = typer.Option(64, help="How many images --calib contributes."),
    opset: int = typer.Option(17, help="ONNX opset."),
    out: Path = typer.Option(None, help="Write the new version here instead of in place "
                                        "(needed for a zipped bundle: a .zip path)."),
) -> None:
    """Export the model for ONNX Runtime (the default CPU backend once a graph is present)."""
    from imgtriage.bundle.export import export_onnx
    from imgtriage.errors import ConfigError

    if not onnx:
        raise ConfigError("choose what to export: --onnx (the only format so far)")
    res = export_onnx(bundle, quantize=quantize, calib=calib, calib_images=calib_images,
                      opset=opset, out=out, log=typer.echo)
    typer.echo(f"bundle: {res.bundle_path} (default precision {res.precision}, "
               f"{res.seconds:.0f}s)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
