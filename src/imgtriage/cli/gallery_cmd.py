"""imgtriage train-fewshot DATA --out RUN; imgtriage gallery add|remove|list|rule|create|
fit-threshold: every option generated (``cli/_options.py``) from a field of FewShotRunOptions,
FewShotConfig or one of the records in ``predict/gallery_edit_config.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options
from imgtriage.predict.gallery_edit_config import (
    GalleryAdd,
    GalleryCreateConfig,
    GalleryListing,
    GalleryOutput,
    GalleryRemoval,
    GalleryRuleChange,
    GalleryThresholdFit,
    NewGalleryOutput,
)
from imgtriage.train.fewshot_config import FewShotConfig
from imgtriage.train.run_options import FewShotRunOptions

gallery_app = typer.Typer(no_args_is_help=True, help="Few-shot galleries: enrol and drop "
                                                     "classes and examples without retraining; "
                                                     "every edit writes a new bundle version.")
BUNDLE = argument("bundle", "Gallery bundle directory or .zip.", Path)


def train_fewshot_command(**options: Any) -> None:
    """A few-shot gallery bundle from class folders: colour photos enrolled through the
    pretrained encoder (no training), or a Siamese / prototype encoder trained episodically
    (--encoder)."""
    from imgtriage.train.fewshot import train_fewshot

    run = config_from_options(FewShotRunOptions, options)
    res = train_fewshot(options["data"], run.out, config_from_options(FewShotConfig, options),
                        quiet=run.quiet, resume=run.resume)
    typer.echo(f"bundle: {res.bundle_path}")


command(train_fewshot_command, arguments=[argument(
    "data", "Folder of class folders (optionally under train/val/test) or a CSV/JSONL "
            "manifest.", Path)], configs=[FewShotRunOptions, FewShotConfig])


def _echo_version(b: Any) -> None:
    typer.echo(f"{b.path}: version {b.info.bundle_version}, classes {b.classes}")
    _echo_scale(b.info.block("scale_fit"))


def _echo_scale(fit: dict | None) -> None:
    if fit:
        typer.echo(fit["line"])


def add_command(**options: Any) -> None:
    """Enrol IMAGES into class --label."""
    from imgtriage.predict.gallery_edit import enrol_images

    add = config_from_options(GalleryAdd, options)
    _echo_version(enrol_images(options["bundle"], add.label, options["images"],
                               out=config_from_options(GalleryOutput, options).out))


command(add_command, arguments=[BUNDLE, argument("images", "Image files to enrol.", list[Path])],
        configs=[GalleryAdd, GalleryOutput])
gallery_app.command("add")(add_command)


def remove_command(**options: Any) -> None:
    """Remove class --label, or only some of its items."""
    from imgtriage.predict.gallery_edit import remove_items

    removal = config_from_options(GalleryRemoval, options)
    chosen = [*removal.images, *(options["items"] or [])]
    _echo_version(remove_items(options["bundle"], removal.label, chosen or None,
                               out=config_from_options(GalleryOutput, options).out))


command(remove_command, arguments=[
    BUNDLE, argument("items", "Items to drop (same as --images).", list[str], None)],
    configs=[GalleryRemoval, GalleryOutput])
gallery_app.command("remove")(remove_command)


def list_command(**options: Any) -> None:
    """Classes, item counts and the scoring rule of a gallery."""
    from imgtriage.predict.gallery_edit import describe_gallery

    listing = config_from_options(GalleryListing, options)
    info = describe_gallery(options["bundle"], items=listing.items)
    if listing.as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    rule = info["rule"]
    typer.echo(f"{info['bundle']} (version {info['bundle_version']}): {rule['method']}"
               f"{' k=' + str(rule['k']) if rule['method'] == 'knn' else ''}, similarity "
               f"threshold {rule['similarity_threshold']}, scale {rule['scale']:.4g}, "
               f"{info['embed_dim']}-d embeddings ({info['encoder']} encoder)")
    _echo_scale(info.get("scale_fit"))
    for name, n in info["classes"].items():
        typer.echo(f"  {name:24s} {n:6d}")
        for item in info.get("items", {}).get(name, []):
            typer.echo(f"      {item}")


command(list_command, arguments=[BUNDLE], configs=[GalleryListing])
gallery_app.command("list")(list_command)


def rule_command(**options: Any) -> None:
    """Change the similarity threshold or scoring method."""
    from imgtriage.predict.gallery_edit import set_rule

    b = set_rule(options["bundle"], config_from_options(GalleryRuleChange, options),
                 out=config_from_options(GalleryOutput, options).out)
    rule = {k: b.info.block("gallery")[k] for k in ("method", "k", "similarity_threshold",
                                                   "scale")}
    typer.echo(f"{b.path}: version {b.info.bundle_version}, rule {rule}")
    _echo_scale(b.info.block("scale_fit"))


# The bundle, one option per GalleryRuleChange field, then where the new version goes.
command(rule_command, arguments=[BUNDLE], configs=[GalleryRuleChange, GalleryOutput])
gallery_app.command("rule")(rule_command)


def create_command(**options: Any) -> None:
    """A new gallery from an existing encoder and a folder of labelled images."""
    from imgtriage.predict.gallery_edit import create_gallery

    out = config_from_options(NewGalleryOutput, options).out
    b = create_gallery(options["source"], options["data"], out,
                       config=config_from_options(GalleryCreateConfig, options))
    typer.echo(f"{b.path}: classes {b.classes}")
    if b.info.block("threshold_fit"):
        _echo_fit(b.info.block("threshold_fit"))
    _echo_scale(b.info.block("scale_fit"))


# The encoder's bundle, the data and the new bundle, then one option per GalleryCreateConfig
# field.
command(create_command, arguments=[
    argument("source", "A gallery bundle, or a classifier bundle of model siamese, whose "
                       "encoder to use.", Path),
    argument("data", "Class folders to enrol.", Path)],
    configs=[NewGalleryOutput, GalleryCreateConfig])
gallery_app.command("create")(create_command)


def fit_threshold_command(**options: Any) -> None:
    """Fit the similarity threshold on the enrolled items (leave-one-out); below it the
    gallery answers unknown."""
    from imgtriage.predict.gallery_edit import fit_threshold

    fit_cfg = config_from_options(GalleryThresholdFit, options)
    b, fit = fit_threshold(options["bundle"], fit_cfg.acceptance,
                           out=config_from_options(GalleryOutput, options).out)
    _echo_fit(fit)
    typer.echo(f"bundle: {b.path} (version {b.info.bundle_version})")


command(fit_threshold_command, arguments=[BUNDLE], configs=[GalleryThresholdFit, GalleryOutput])
gallery_app.command("fit-threshold")(fit_threshold_command)


def _echo_fit(fit: dict) -> None:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    how = f", {fit['correction']}" if fit.get("correction") else ""  # None: plain
    typer.echo(f"similarity threshold {fit['threshold']} (acceptance {fit['acceptance']}, "
               f"{fit['n_items']} enrolled items held out in turn{how}): held-out accuracy "
               f"{pct(fit['held_out_accuracy'])}, coverage {pct(fit['held_out_coverage'])}, "
               f"accuracy at coverage {pct(fit['accuracy_at_coverage'])}")


def register(app: typer.Typer) -> None:
    app.command("train-fewshot")(train_fewshot_command)
    app.add_typer(gallery_app, name="gallery")
