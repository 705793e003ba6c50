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
                                            "for CNNs) or dynamic (slower for CNNs). It "
                                            "becomes the default only when the check on "
                                            "held-out images proves it (accuracy drop <= 0.5 "
                                            "points, agreement >= 99%)."),
    calib: Path = typer.Option(None, help="RUN/splits.csv (calibrate on its train rows, check "
                                          "on its val rows), another CSV/JSONL manifest, or a "
                                          "folder (class folders named like the bundle's "
                                          "classes give labels; a seeded part is held out for "
                                          "the check)."),
    check: Path = typer.Option(None, help="Held-out labelled images (folder or manifest) to "
                                          "judge int8 on, instead of --calib's val rows."),
    calib_images: int = typer.Option(64, help="How many training images calibrate int8."),
    check_images: int = typer.Option(500, help="How many held-out images judge int8."),
    opset: int = typer.Option(17, help="ONNX opset."),
    out: Path = typer.Option(None, help="Write the new version here instead of in place "
                                        "(needed for a zipped bundle: a .zip path)."),
) -> None:
    """Export the model for ONNX Runtime (the default CPU backend once a graph is present)."""
    from imgtriage.errors import ConfigError
    from imgtriage.predict.export import export_onnx

    if not onnx:
        raise ConfigError("choose what to export: --onnx (the only format so far)")
    res = export_onnx(bundle, quantize=quantize, calib=calib, check=check,
                      calib_images=calib_images, check_images=check_images, opset=opset,
                      out=out, log=typer.echo)
    typer.echo(f"bundle: {res.bundle_path} (default precision {res.precision}, "
               f"{res.seconds:.0f}s)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
