"""imgtriage inspect BUNDLE"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from imgtriage.bundle import Manifest
from imgtriage.bundle.inspect_config import InspectConfig
from imgtriage.cli._options import argument, command, config_from_options


def inspect_command(**options: Any) -> None:
    """Verify a bundle and print what it holds: model, input, classes, decision rule."""
    from imgtriage.bundle import load_bundle
    from imgtriage.bundle.graph import graph_summary
    from imgtriage.evaluate.decision import DecisionPolicy

    cfg = config_from_options(InspectConfig, options)
    b = load_bundle(options["bundle"], verify=cfg.verify)
    if cfg.as_json:
        typer.echo(json.dumps(b.manifest, indent=2))
        return
    m = b.info
    pre, dec = m.preprocess, m.decision
    lines = [
        f"bundle      {b.path}  (schema v{m.schema_version}, bundle v{m.bundle_version}, "
        f"{m.kind})",
        f"sha256      {b.sha256}",
        f"model       {m.model.name} {m.model.kwargs or ''}",
        f"input       {pre['in_chans']} ch, {pre['size'][0]}x{pre['size'][1]}, scaling "
        f"{pre['scaling']}, stretch {pre['stretch']}, resize {pre['resize']}",
        f"classes     {', '.join(m.classes)}",
        f"decision    T={dec.get('temperature')} thresholds={dec.get('thresholds')} "
        f"abstain={dec.get('abstain')} conformal={'yes' if dec.get('conformal') else 'no'}"
        + (f" prior_correction={dec['prior_correction']} "
           f"({DecisionPolicy.from_dict(dec).describe_priors()})"
           if dec.get("prior_correction") else ""),
        f"unknowns    {_unknowns(m)}",
        *([f"gallery     {_gallery(m)}"] if m.kind == "gallery" else []),
        *([f"cascade     {_cascade(m)}"] if m.kind == "cascade" else []),
        f"profiles    {', '.join(m.profiles) or '-'}",
        f"runtime     {graph_summary(m.block('onnx'))}",
        f"metrics     {json.dumps(m.metrics)}",
        "files       " + ", ".join(f"{k} ({v[:12]}…)" for k, v in m.files.items()),
        f"versions    {json.dumps(m.versions)}",
    ]
    typer.echo("\n".join(lines))
    typer.echo("verified: every file matches its sha256, the weights are safetensors and "
               "the manifest is within its schema bounds" if cfg.verify
               else "not verified (--no-verify): file hashes and weights were not checked")


command(inspect_command, arguments=[argument("bundle", "Bundle directory or .zip.", Path)],
        configs=[InspectConfig])


def _unknowns(m: Manifest) -> str:
    """What the default rule refuses, from the calibration record (one line)."""
    dec = m.decision
    ood = dec.get("ood")
    cal = (m.block("calibration") or {}).get("default") or {}
    parts = []
    if ood:
        parts.append(f"out-of-distribution: {ood['method']} k={ood['k']} threshold "
                     f"{ood['threshold']:.4g} (accepts {ood['accept']:.0%} of validation)")
    else:
        parts.append("no out-of-distribution rule")
    rule = cal.get("default_rule")
    if rule:
        acc = rule["accuracy_answered"]
        parts.append(f"on validation (n={rule['n']}): answers {rule['coverage']:.0%}"
                     + (f" at {acc:.1%} accuracy" if acc is not None else ""))
    if cal.get("skipped"):
        parts.append(f"not calibrated: {cal['skipped']}")
    note = (cal.get("temperature") or {}).get("note")
    if note:
        parts.append(note)
    return "; ".join(parts)


def _gallery(m: Manifest) -> str:
    """A gallery's rule and how its scale was chosen (one line)."""
    g = m.block("gallery") or {}
    fit = m.block("scale_fit")
    how = fit["line"] if fit else f"scale {g.get('scale')} (written before scales were fitted)"
    return (f"{g.get('method')}{' k=' + str(g.get('k')) if g.get('method') == 'knn' else ''}, "
            f"similarity threshold {g.get('similarity_threshold')}; {how}")


def _cascade(m: Manifest) -> str:
    """A cascade's first stage, gate and OOD gate (one line)."""
    c = m.block("cascade") or {}
    g = c.get("ood_gate")
    if g is None:
        ood = "no OOD gate (the first stage answers any input it is confident about)"
    else:
        src = "the stage-1 bundle" if g.get("source") == "stage1" else "the cascade"
        ood = (f"OOD gate {g.get('method')} from {src}, threshold {g.get('threshold'):.4g} "
               f"(accepts {g.get('accept'):.0%} of validation; the rest go to stage 2)")
    first = (c.get("first_stage") or {}).get("type")
    return f"first stage {first}, gate {c.get('gate')}, T={c.get('temperature')}; {ood}"


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
