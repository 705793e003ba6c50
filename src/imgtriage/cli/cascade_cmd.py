"""imgtriage cascade STAGE2_BUNDLE DATA --out CASCADE_BUNDLE"""

from __future__ import annotations

from pathlib import Path

import typer


def cascade_command(
    stage2: Path = typer.Argument(..., help="The second-stage (CNN) classifier bundle."),
    data: Path = typer.Argument(..., help="The labelled data stage 2 was trained on (class "
                                          "folders or a CSV/JSONL manifest)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cascade bundle to write (a directory, "
                                                      "or a .zip)."),
    first_stage: str = typer.Option("logreg", help="logreg or gbt on image-statistics and "
                                                   "header features, or a small classifier "
                                                   "bundle's path."),
    target_accuracy: float = typer.Option(0.99, help="Accuracy the first stage must reach on "
                                                     "the validation images it answers."),
    route_share: float = typer.Option(None, help="Instead of a target accuracy: send this "
                                                 "share of validation images to stage 2."),
    gate_confidence: float = typer.Option(0.95, help="Confidence (one-sided Clopper-Pearson) "
                                                     "that the first stage's answers reach "
                                                     "--target-accuracy; too small a "
                                                     "validation set is refused. 0 trusts "
                                                     "the observed accuracy."),
    always_second_stage: str = typer.Option(None, help="Comma-separated classes the first "
                                                       "stage never answers (e.g. sar): "
                                                       "images it thinks may be one go to "
                                                       "stage 2."),
    feature_channels: int = typer.Option(None, help="Channels of the per-channel statistics "
                                                    "(default 3 for an RGB stage 2, else 1)."),
    feature_max_side: int = typer.Option(64, help="Statistics use every s-th pixel so no "
                                                  "side exceeds this."),
    val_frac: float = typer.Option(None, help="Validation share (default: stage 2's)."),
    seed: int = typer.Option(None, help="Split seed (default: stage 2's)."),
    workers: int = typer.Option(None, help="Decoding threads."),
    threads: int = typer.Option(None, help="Compute threads."),
) -> None:
    """Build a two-stage cascade: a cheap first stage answers what it is sure of."""
    from imgtriage.data.features import FeatureSpec
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    if threads:
        import torch

        torch.set_num_threads(threads)
    features = None
    if feature_channels is not None or feature_max_side != 64:
        from imgtriage.bundle import load_bundle

        in_chans = load_bundle(stage2).info.model.in_chans
        features = FeatureSpec(channels=feature_channels or (3 if in_chans == 3 else 1),
                               max_side=feature_max_side)
    cfg = CascadeConfig(first_stage=first_stage, target_accuracy=target_accuracy,
                        route_share=route_share, gate_confidence=gate_confidence,
                        always_second_stage=tuple(c.strip() for c in (always_second_stage or "")
                                                  .split(",") if c.strip()),
                        features=features, val_frac=val_frac,
                        seed=seed, workers=workers)
    res = build_cascade(stage2, data, out, cfg)
    v = res.validation
    acc = v["accepted_accuracy"]
    typer.echo(f"cascade: {res.bundle_path} ({res.seconds:.1f}s)\n"
               f"validation ({v['n']} images): gate {v['threshold']}, first stage answers "
               f"{v['accepted_share']:.1%} at accuracy "
               f"{'n/a' if acc is None else f'{acc:.4f}'}; cascade accuracy "
               f"{v['cascade_accuracy']:.4f} vs stage 2 alone {v['stage2_accuracy']:.4f}"
               + (f"; {v['routed_by_class']} routed by class" if always_second_stage else ""))


def register(app: typer.Typer) -> None:
    app.command("cascade")(cascade_command)
