"""Where a training run writes and how it talks, as frozen records: what ``train(data, out,
config, quiet=..., resume=...)`` and ``train_fewshot(data, out, config, quiet=...,
resume=...)`` take
besides their config (``imgtriage train`` / ``train-fewshot`` build these options from them).

They are kept apart from :class:`~imgtriage.train.config.TrainConfig`, which is saved in the
bundle: where a run was written and whether it printed progress decide no answer.

Example:
    >>> TrainRunOptions().out, FewShotRunOptions(quiet=True).quiet
    (PosixPath('runs/latest'), True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_QUIET = "No progress output."
_RESUME = ("Continue OUT/checkpoint exactly (optimizer, schedule, sampler and RNG state); "
           "the other options must match the checkpoint's.")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainRunOptions:
    """The run directory of ``train``, whether to resume it, and whether to print progress."""

    out: Path = field(default=Path("runs/latest"), metadata={
        "help": "Run directory: config, splits, metrics log, curves, checkpoint/, bundle/.",
        "short": "-o"})
    resume: bool = _f(False, _RESUME, switch=True)
    quiet: bool = _f(False, _QUIET, switch=True, short="-q")


@dataclass(frozen=True)
class FewShotRunOptions:
    """The run directory of ``train_fewshot``, whether to resume it (few-shot training runs
    in the same loop, with the same checkpoints) and whether to print progress."""

    out: Path = field(default=Path("runs/fewshot"), metadata={
        "help": "Run directory: config, splits, metrics log, curves, checkpoint/, bundle/.",
        "short": "-o"})
    resume: bool = _f(False, _RESUME, switch=True)
    quiet: bool = _f(False, _QUIET, switch=True, short="-q")
