"""What :func:`~imgtriage.train.loop.fit` trains a network *for*, when that is not
classification: the one place a training recipe differs from the plain loop.

Classification (the default, ``objective=None``) draws shuffled or class-balanced batches
with :class:`~imgtriage.data.samplers.TrainSampler`, trains the logits with ``--loss-strategy``
(mixing and semi-supervised views included) and validates on the confusion matrix. An
:class:`Objective` replaces exactly those three things, and nothing else: the optimiser,
the LR schedule, precision, DDP, EMA, progress lines, the metrics log, early stopping,
checkpoints and exact resume stay the loop's. Few-shot training is one
(:class:`imgtriage.train.fewshot.EpisodicObjective`: balanced episodes and a metric loss on
embeddings).

Example:
    >>> from imgtriage.train.fewshot import EpisodicObjective
    >>> obj = EpisodicObjective("proto", n_way=2, k_shot=1, n_query=1, episodes=3)
    >>> isinstance(obj, Objective), obj.stat
    (True, 'train_episode_accuracy')
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from imgtriage.train.distributed import DistInfo

__all__ = ["EpochSampler", "Objective"]


@runtime_checkable
class EpochSampler(Protocol):
    """The order of one epoch's indices for this process; ``len`` is how many it yields.
    Its state (a few JSON numbers) goes into checkpoints, so resuming is exact."""

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Any: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Objective(Protocol):
    """A batch source and a loss plugged into :func:`~imgtriage.train.loop.fit`.

    ``stat`` names the training statistic :meth:`loss` returns (averaged over the epoch's
    samples into the history, like ``train_accuracy``); :meth:`validate` returns the
    epoch's validation metrics (``cfg.select_metric`` among them); :meth:`settings` is
    saved with every checkpoint and must be equal to resume from it.
    """

    stat: str

    def sampler(self, labels: np.ndarray, seed: int, dist: DistInfo) -> EpochSampler:
        """The sampler of the training source (indices into ``labels``)."""
        ...

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(loss to minimise, the batch's ``stat``) from the network's output on a batch."""
        ...

    def validate(self, model: nn.Module, train: Any, val: Any) -> dict[str, float]:
        """Metrics of ``model`` (eval mode is the objective's to set) on the sources."""
        ...

    def settings(self) -> dict[str, Any]:
        """JSON settings a checkpoint must have been made with to be resumed."""
        ...
