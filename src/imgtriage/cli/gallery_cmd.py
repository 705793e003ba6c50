"""imgtriage train-fewshot DATA --out RUN; imgtriage gallery add|remove|list|rule|create."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import config_from_options, config_parameters
from imgtriage.predict.gallery_edit_config import GalleryCreateConfig, GalleryRuleChange
from imgtriage.train.fewshot_config import FewShotConfig

gallery_app = typer.Typer(no_args_is_help=True, help="Few-shot galleries: enrol and drop "
                                                     "classes and examples without retraining; "
                                                     "every edit writes a new bundle version.")
_OUT_HELP = "Write the new version here instead of replacing BUNDLE (history is kept either way)."


def train_fewshot_command(**options: Any) -> None:
    """Train a Siamese / prototype encoder episodically and save a gallery bundle."""
    from imgtriage.train.fewshot import train_fewshot

    data, out, quiet = options.pop("data"), options.pop("out"), options.pop("quiet")
    res = train_fewshot(data, out, config_from_options(FewShotConfig, options), quiet=quiet)
    typer.echo(f"bundle: {res.bundle_path}")


# One option per FewShotConfig field (its help text and flag live with the field).
train_fewshot_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Folder of class folders (optionally "
                                             "under train/val/test) or a CSV/JSONL manifest.")),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                      default=typer.Option(Path("runs/fewshot"), "--out", "-o",
                                           help="Run directory: config, splits, metrics log, "
                                                "bundle/.")),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--quiet", "-q", help="No progress output.")),
    *config_parameters(FewShotConfig)])


@gallery_app.command("add")
def add_command(
    bundle: Path = typer.Argument(..., help="Gallery bundle directory or .zip."),
    images: list[Path] = typer.Argument(..., help="Image files to enrol."),
    label: str = typer.Option(..., "--label", "-l", help="Class to enrol them into (a new "
                                                         "class when absent)."),
    out: Path = typer.Option(None, "--out", "-o", help=_OUT_HELP),
) -> None:
    """Enrol IMAGES into class --label."""
    from imgtriage.predict.gallery_edit import enrol_images

    b = enrol_images(bundle, label, images, out=out)
    typer.echo(f"{b.path}: version {b.info.bundle_version}, classes {b.classes}")


@gallery_app.command("remove")
def remove_command(
    bundle: Path = typer.Argument(..., help="Gallery bundle directory or .zip."),
    items: list[str] = typer.Argument(None, help="Items to drop (same as --images)."),
    label: str = typer.Option(..., "--label", "-l", help="Class to remove (or to remove "
                                                         "items from)."),
    images: list[str] = typer.Option(None, "--images", help="Only these items (enrolled path "
                                                            "or file name); repeatable."),
    out: Path = typer.Option(None, "--out", "-o", help=_OUT_HELP),
) -> None:
    """Remove class --label, or only some of its items."""
    from imgtriage.predict.gallery_edit import remove_items

    chosen = [*(images or []), *(items or [])]
    b = remove_items(bundle, label, chosen or None, out=out)
    typer.echo(f"{b.path}: version {b.info.bundle_version}, classes {b.classes}")


@gallery_app.command("list")
def list_command(
    bundle: Path = typer.Argument(..., help="Gallery bundle directory or .zip."),
    items: bool = typer.Option(False, "--items", help="Also list every enrolled item."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classes, item counts and the scoring rule of a gallery."""
    from imgtriage.predict.gallery_edit import describe_gallery

    info = describe_gallery(bundle, items=items)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    rule = info["rule"]
    typer.echo(f"{info['bundle']} (version {info['bundle_version']}): {rule['method']}"
               f"{' k=' + str(rule['k']) if rule['method'] == 'knn' else ''}, similarity "
               f"threshold {rule['similarity_threshold']}, {info['embed_dim']}-d embeddings")
    for name, n in info["classes"].items():
        typer.echo(f"  {name:24s} {n:6d}")
        for item in info.get("items", {}).get(name, []):
            typer.echo(f"      {item}")


def rule_command(**options: Any) -> None:
    """Change the similarity threshold or scoring method."""
    from imgtriage.predict.gallery_edit import set_rule

    bundle, out = options.pop("bundle"), options.pop("out")
    b = set_rule(bundle, config_from_options(GalleryRuleChange, options), out=out)
    rule = {k: b.info.block("gallery")[k] for k in ("method", "k", "similarity_threshold")}
    typer.echo(f"{b.path}: version {b.info.bundle_version}, rule {rule}")


# The bundle, one option per GalleryRuleChange field, then where the new version goes.
rule_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("bundle", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Gallery bundle directory or .zip.")),
    *config_parameters(GalleryRuleChange),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                      default=typer.Option(None, "--out", "-o", help=_OUT_HELP))])
gallery_app.command("rule")(rule_command)


def create_command(**options: Any) -> None:
    """A new gallery from an existing encoder and a folder of labelled images."""
    from imgtriage.predict.gallery_edit import create_gallery

    source, data, out = options.pop("source"), options.pop("data"), options.pop("out")
    b = create_gallery(source, data, out,
                       config=config_from_options(GalleryCreateConfig, options))
    typer.echo(f"{b.path}: classes {b.classes}")
    if b.info.block("threshold_fit"):
        _echo_fit(b.info.block("threshold_fit"))


# The encoder's bundle, the data and the new bundle, then one option per GalleryCreateConfig
# field.
create_command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="A gallery bundle, or a classifier "
                                             "bundle of model siamese, whose encoder to use.")),
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Class folders to enrol.")),
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
                      default=typer.Option(..., "--out", "-o", help="The new gallery bundle.")),
    *config_parameters(GalleryCreateConfig)])
gallery_app.command("create")(create_command)


@gallery_app.command("fit-threshold")
def fit_threshold_command(
    bundle: Path = typer.Argument(..., help="Gallery bundle directory or .zip."),
    acceptance: float = typer.Option(0.95, help="Share of the held-out enrolled items answered "
                                                "correctly that the threshold keeps."),
    out: Path = typer.Option(None, "--out", "-o", help=_OUT_HELP),
) -> None:
    """Fit the similarity threshold on the enrolled items (leave-one-out); below it the
    gallery answers unknown."""
    from imgtriage.predict.gallery_edit import fit_threshold

    b, fit = fit_threshold(bundle, acceptance, out=out)
    _echo_fit(fit)
    typer.echo(f"bundle: {b.path} (version {b.info.bundle_version})")


def _echo_fit(fit: dict) -> None:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    typer.echo(f"similarity threshold {fit['threshold']} (acceptance {fit['acceptance']}, "
               f"{fit['n_items']} enrolled items held out in turn): held-out accuracy "
               f"{pct(fit['held_out_accuracy'])}, coverage {pct(fit['held_out_coverage'])}, "
               f"accuracy at coverage {pct(fit['accuracy_at_coverage'])}")


def register(app: typer.Typer) -> None:
    app.command("train-fewshot")(train_fewshot_command)
    app.add_typer(gallery_app, name="gallery")
