"""Which route ``--model auto`` trains when the choice is in doubt: measured, not guessed.

Rule 1 of :mod:`imgtriage.train.auto` sends RGB photos and grey images of 96 px or more to a
pretrained backbone. For photos the measurements agree (CIFAR-small: 87.5% fine-tuned
against 73.8% from scratch). For grey images they do not: on MSTAR's SAR chips the head on
cached ImageNet embeddings reached 78.2% test (validation 0.864), the from-scratch recipe
99.1%; on magnetic tiles the head gave 0.906 balanced accuracy and fine-tuning did not beat
it (docs/benchmarks.md). And when the budget leaves no fine-tuning epoch (a slow or busy
machine), the pretrained route is its head alone.

In those two cases (``--route-check auto``) the run measures the first stage of each route
on the validation split before committing to one:

1. the head on cached embeddings (the pretrained route's own first phase, kept if it wins);
2. ``PROBE_EPOCHS`` epochs of the from-scratch recipe (its own short one-cycle; kept if it
   wins: the full from-scratch run starts from the probe's best epoch, with its own
   one-cycle);

and compares them on the selection metric (accuracy, or balanced accuracy / macro F1 when
that selects the epoch). The two first stages are not alike: the head on frozen embeddings
is close to converged, while a from-scratch network after a few epochs is far from it. So
the probe is projected to the length the from-scratch route would train (probe + planned
epochs) along a power-law learning curve, error(E) = error(probe) * (probe / E) ** 0.5
(:func:`projected_score`), and the route with the higher figure trains. The exponent is
a cautious middle: the from-scratch error fell as E ** -1.3 on MSTAR's SAR chips (0.155
after 3 of 24 epochs, 0.01 at the end), and slowly on the magnetic tiles (balanced error 0.41
after 3 epochs, still ~0.25 after a 22-minute run); with 0.5 the check orders both data sets
as their full runs did (MSTAR: from scratch 99.1% against 90.9% for the fine-tuned lite0;
tiles: the pretrained head 0.92 balanced against ~0.75 from scratch). The head's own
figure is not projected: fine-tuning may add to it or not (it added nothing on the tiles).
Both routes are planned up front for the budget the check leaves them, and the train output
and ``run.json`` (``model_choice``, ``route_check``) say what was measured and chosen.

Example:
    >>> v = decide_route({"val_accuracy": 0.86}, {"val_accuracy": 0.80}, "val_accuracy", 3,
    ...                  planned_epochs=30)
    >>> v.route, round(v.projected, 3)
    ('scratch', 0.937)
    >>> decide_route({"val_accuracy": 0.92}, {"val_accuracy": 0.59}, "val_accuracy", 3,
    ...              planned_epochs=12).route
    'pretrained'
    >>> compare_metric("val_loss"), compare_metric("val_balanced_accuracy")
    ('val_accuracy', 'val_balanced_accuracy')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from imgtriage.train.auto import ImageProbe, choose_model
from imgtriage.train.auto_recipe import (
    DECODE_FACTOR,
    Costs,
    finetune_sides,
    plan_finetune,
    plan_recipe_timed,
    plan_scratch,
    pretrained_costs,
    scratch_variants,
)
from imgtriage.train.config import TrainConfig, settled

PROBE_EPOCHS = 3  # MSTAR, run-G network at 64 px: validation 0.85-0.91 after 3-4 epochs
CURVE_EXPONENT = 0.5  # error ~ epochs ** -0.5 (MSTAR fell as -1.3, the tiles far slower)
PROBE_SHARE = 0.25  # of --time-budget at most for the probe (fewer epochs, or no check)
MIN_SCRATCH_BUDGET_S = 60.0


def compare_metric(select_metric: str) -> str:
    """The validation metric the two routes are compared on: the one that selects the best
    epoch when it is an accuracy-like score, else plain accuracy (losses of differently
    smoothed models do not compare)."""
    return (select_metric if select_metric in ("val_balanced_accuracy", "val_macro_f1")
            else "val_accuracy")


def route_doubt(cfg: TrainConfig, grey: bool, finetune_epochs: int, n_val: int,
                scratch_model: str) -> str | None:
    """Why the pretrained route is in doubt for this run (None: it is not, or the check
    cannot or must not run).

    Example:
        >>> route_doubt(TrainConfig(), True, 8, 250, "deep_cnn")
        'grey images: ImageNet features fit them less surely than photos'
        >>> route_doubt(TrainConfig(), False, 8, 250, "deep_cnn") is None
        True
    """
    given = [k for k in ("freeze_backbone", "freeze_epochs", "epochs", "pretrained")
             if cfg.is_given(k) and getattr(cfg, k) != "auto"]
    if cfg.route_check != "auto" or given or n_val < 1 or scratch_model == "siamese":
        return None  # options say what to train; no validation split; few-shot labels
    if finetune_epochs < 1:
        return "no fine-tuning epoch fits the budget, so the pretrained route is its head alone"
    if grey:
        return "grey images: ImageNet features fit them less surely than photos"
    return None


@dataclass(frozen=True)
class RouteCheck:
    """The from-scratch alternative to a pretrained run, planned for the budget left after
    the check, and the short probe of it that the check trains."""

    scratch: TrainConfig
    reason: str            # the from-scratch choice and recipe, one line per decision
    probe_epochs: int
    probe_s: float         # estimated seconds of the probe
    head_s: float          # estimated seconds of the head phase (the embedding pass)
    why: str
    planned: dict | None = None  # the seconds a switch to scratch plans (run.json -> time)

    @property
    def metric(self) -> str:
        return compare_metric(self.scratch.select_metric)

    def probe_config(self) -> TrainConfig:
        """The from-scratch recipe for ``probe_epochs`` (its own one-cycle)."""
        return replace(self.scratch, epochs=self.probe_epochs,
                       freeze_epochs=min(self.scratch.freeze_epochs, self.probe_epochs - 1))


def projected_score(probe: float, probe_epochs: int, total_epochs: int) -> float:
    """The from-scratch route's validation score projected from its probe to
    ``total_epochs`` along error(E) = error(probe) * (probe_epochs / E) ** CURVE_EXPONENT
    (never below the probe's own score; NaN stays NaN).

    Example:
        >>> round(projected_score(0.8, 3, 12), 3), projected_score(0.8, 3, 3)
        (0.9, 0.8)
    """
    if total_epochs <= probe_epochs or not math.isfinite(probe):
        return probe
    error = max(1.0 - probe, 0.0)
    return 1.0 - error * (probe_epochs / total_epochs) ** CURVE_EXPONENT


@dataclass(frozen=True)
class RouteVerdict:
    """What the check measured and which route it chose."""

    route: str             # "pretrained" or "scratch"
    metric: str
    head: float
    probe: float
    probe_epochs: int
    seconds: float = 0.0
    projected: float = math.nan   # the probe projected to the from-scratch route's length
    total_epochs: int = 0         # probe + planned from-scratch epochs

    def line(self) -> str:
        won = ("the from-scratch route trains on from the probe's best epoch (the "
               "pretrained head is dropped)"
               if self.route == "scratch" else "the pretrained route continues from its head")
        ahead = (f", projected to {self.projected:.3f} over the route's {self.total_epochs} "
                 f"epochs (error x (epochs ratio)^{CURVE_EXPONENT:g})"
                 if self.total_epochs > self.probe_epochs else "")
        return (f"route check: validation {self.metric} {self.head:.3f} for the pretrained "
                f"head on cached embeddings against {self.probe:.3f} after "
                f"{self.probe_epochs} from-scratch epoch(s){ahead} -> {won}"
                f"{f' ({self.seconds:.0f}s for the probe)' if self.seconds else ''}")

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "metric": self.metric, "head": self.head,
                "scratch_probe": self.probe, "probe_epochs": self.probe_epochs,
                "scratch_projected": self.projected, "scratch_total_epochs": self.total_epochs,
                "curve_exponent": CURVE_EXPONENT,
                "probe_seconds": round(self.seconds, 1), "line": self.line()}


def decide_route(head_metrics: dict[str, float], probe_metrics: dict[str, float],
                 metric: str, probe_epochs: int, seconds: float = 0.0, *,
                 planned_epochs: int = 0) -> RouteVerdict:
    """The route that scores higher on validation ``metric``: the head as measured against
    the probe projected to ``planned_epochs`` in all (:func:`projected_score`; 0: the probe
    as measured). A tie or a missing figure keeps the pretrained route (already paid for:
    its head is trained)."""
    head = float(head_metrics.get(metric, math.nan))
    probe = float(probe_metrics.get(metric, math.nan))
    total = max(planned_epochs, probe_epochs)
    ahead = projected_score(probe, probe_epochs, total)
    route = "scratch" if ahead > head else "pretrained"  # NaN compares False
    return RouteVerdict(route, metric, head, probe, probe_epochs, seconds, ahead, total)


def _with_budget(cfg: TrainConfig, seconds: float) -> TrainConfig:
    return replace(cfg, time_budget=max(seconds, MIN_SCRATCH_BUDGET_S) / 60)


def plan_routes(cfg: TrainConfig, base: TrainConfig, counts: dict[str, int], n_val: int,
                probe: ImageProbe, *, size_given: bool,
                pcosts: Costs | None = None, scosts: Costs | dict | None = None
                ) -> tuple[TrainConfig, str, RouteCheck | None, dict | None]:
    """Plan a pretrained run (``cfg``: the backbone chosen; ``base``: the config before the
    choice), with a route check when the route is in doubt (:func:`route_doubt`).

    Without a check this is :func:`~imgtriage.train.auto_recipe.plan_recipe`. With one, the
    pretrained route is planned for the budget minus the probe, and the from-scratch route
    (the model :func:`~imgtriage.train.auto.choose_model` picks without weights) for the
    budget minus the probe and the head phase. ``pcosts`` / ``scosts``: the measured costs
    of each (None: timed here). The fourth value is the seconds the pretrained route plans
    (:func:`~imgtriage.train.auto_recipe.planned_record`; with a check, its probe
    included); the check's ``planned`` is the from-scratch route's (probe and head phase
    included).
    """
    n_train, source_side = sum(counts.values()), min(probe.median_hw)
    common = {"rgb_photos": probe.in_chans == 3, "source_side": source_side,
              "size_given": size_given, "in_chans": probe.in_chans,
              "eight_bit": probe.eight_bit, "decode_s": probe.read_s * DECODE_FACTOR}
    budget = cfg.time_budget * 60
    native = cfg.img_size or 224
    sides = [native] if size_given else finetune_sides(native, source_side)
    pcosts = pcosts or pretrained_costs(cfg, len(counts), source_side, size_given)
    alt = choose_model(counts, replace(probe, in_chans=base.in_chans or probe.in_chans),
                       img_size=base.img_size)
    why = route_doubt(cfg, probe.in_chans == 1,
                      plan_finetune(n_train, n_val, pcosts, budget, sides).epochs, n_val,
                      alt.model)
    if why is None:
        planned, recipe, secs = plan_recipe_timed(cfg, counts, n_val, pretrained=True,
                                                  costs=pcosts, **common)
        return planned, recipe, None, secs
    scfg = replace(base, model=alt.model, img_size=alt.img_size)
    variants = scratch_variants(scfg, len(counts), size_given, scosts)
    head_s = _head_seconds(n_train, n_val, pcosts, budget, sides, native)
    first = plan_scratch(n_train, n_val, variants, budget - head_s)
    epochs = min(PROBE_EPOCHS, int(PROBE_SHARE * budget // max(first.epoch_s, 1e-9)))
    if epochs < 1:
        planned, recipe, secs = plan_recipe_timed(cfg, counts, n_val, pretrained=True,
                                                  costs=pcosts, **common)
        return planned, (f"{recipe}; no route check ({why}): one from-scratch epoch "
                         f"(~{first.epoch_s:.0f}s) would take more than "
                         f"{PROBE_SHARE:.0%} of the budget"), None, secs
    probe_s = epochs * first.epoch_s
    head_s = _head_seconds(n_train, n_val, pcosts, budget - probe_s, sides, native)
    planned, recipe, secs = plan_recipe_timed(_with_budget(cfg, budget - probe_s), counts,
                                              n_val, pretrained=True, costs=pcosts, **common)
    left = budget - probe_s - head_s
    scratch, srecipe, ssecs = plan_recipe_timed(_with_budget(scfg, left), counts, n_val,
                                                pretrained=False,
                                                costs={w: c for _, w, c in variants}, **common)
    scratch = settled(replace(scratch, time_budget=cfg.time_budget))
    check = RouteCheck(scratch, f"{alt.reason}; {srecipe}", epochs, probe_s, head_s, why,
                       _plus(ssecs, probe_s + head_s, "route_check_s"))
    line = (f"route check ({why}): the head on cached embeddings (~{head_s:.0f}s) and "
            f"{epochs} epoch(s) of the from-scratch route ({alt.model}, ~{probe_s:.0f}s) are "
            f"compared on validation {check.metric} (the probe projected to the "
            f"{epochs + scratch.epochs} epochs of its route) before one is trained; the pretrained "
            f"plan below is for {(budget - probe_s) / 60:.1f} of the {cfg.time_budget:g} min, "
            f"the from-scratch one for {max(left, MIN_SCRATCH_BUDGET_S) / 60:.1f} "
            f"(--route-check off: no check)")
    return (replace(planned, time_budget=cfg.time_budget), f"{line}; {recipe}", check,
            _plus(secs, probe_s, "route_check_s"))


def _plus(planned: dict | None, seconds: float, name: str) -> dict | None:
    """A plan's seconds with another planned part (``name``) added to its total."""
    if planned is None:
        return None
    return {**planned, name: round(seconds, 1),
            "total_s": round(float(planned["total_s"]) + seconds, 1)}


def _head_seconds(n_train: int, n_val: int, costs: Costs, budget_s: float, sides: list[int],
                  native: int) -> float:
    """The pretrained route's head phase (one embedding pass) at the side it would plan."""
    plan = plan_finetune(n_train, n_val, costs, budget_s, sides)
    return plan.embed_s if plan.epochs >= 1 else (n_train + n_val) * costs.at(native).infer
