"""imgtriage train DATA --out RUN"""

from __future__ import annotations

from pathlib import Path

import typer

from imgtriage.train.config import AUGMENT_POLICIES


def train_command(
    data: Path = typer.Argument(..., help="Folder of class folders (optionally under "
                                          "train/val/test) or a CSV/JSONL manifest "
                                          "with path,label[,group][,split]."),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o",
                             help="Run directory: config, splits, metrics log, bundle/."),
    model: str = typer.Option("crop_cnn", help="Architecture (see `imgtriage models`), or "
                                               "timm:<name> for any timm model."),
    img_size: int = typer.Option(None, help="Input size in pixels (square); default: the "
                                            "model's own."),
    in_chans: int = typer.Option(None, help="Input channels; default: 1 if every image is "
                                            "grayscale, else 3."),
    epochs: int = typer.Option(10, help="Training epochs."),
    batch_size: int = typer.Option(64, help="Images per optimisation step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (one-cycle schedule)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    val_frac: float = typer.Option(0.15, help="Share of each class held out for validation "
                                              "when the data has no val split."),
    test_frac: float = typer.Option(0.0, help="Share held out as a test split."),
    augment: str = typer.Option("none", help="Augmentation policy: " + "; ".join(
        f"{k}: {v}" for k, v in AUGMENT_POLICIES.items())),
    scaling: str = typer.Option("dtype", help="Pixel scaling: dtype (divide by the dtype's "
                                              "max), minmax or percentile (scientific data)."),
    stretch: str = typer.Option("linear", help="Intensity stretch: linear, asinh or log."),
    resize: str = typer.Option("squash", help="squash, shorter_crop or pad."),
    pretrained: str = typer.Option(None, help="'hub' for timm/hub weights (online), or a "
                                              "local .safetensors/.pth file."),
    seed: int = typer.Option(0, help="Seed for splits, sampling and initialisation."),
    threads: int = typer.Option(None, help="Compute threads (default: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a classifier and save a bundle under OUT/bundle."""
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    cfg = TrainConfig(model=model, img_size=img_size, in_chans=in_chans, epochs=epochs,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      val_frac=val_frac, test_frac=test_frac, augment=augment,
                      scaling=scaling, stretch=stretch, resize=resize,
                      pretrained=(True if pretrained == "hub" else pretrained or False),
                      seed=seed, num_threads=threads)
    res = train(data, out, cfg, quiet=quiet)
    typer.echo(f"bundle: {res.bundle_path}")


def models_command() -> None:
    """List the registered architectures and what each is for."""
    from imgtriage.models import get_entry, list_models

    for name in list_models():
        e = get_entry(name)
        typer.echo(f"{name:24s} {e.family:8s} {e.default_size[0]}x{e.default_size[1]}  "
                   f"{e.description}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("models")(models_command)
