"""The training sampler: shuffled or class-balanced epochs, sharded across processes.

One epoch always has as many draws as the dataset has samples. With ``balanced=True`` every
class gets the same share of the draws, except that no image may appear more than
``max_repeat`` times in one epoch: a class too small for its share is capped at
``max_repeat × n_c`` draws and the rest of the epoch is spread over the other classes
(water-filling). Large classes are subsampled without replacement, a different subset each
epoch.

The order of an epoch is a pure function of ``(seed, epoch)``, so a resumed run replays
exactly the epochs it would have seen. Under ``torchrun`` each of ``num_replicas``
processes takes a disjoint strided shard of the same global order, padded by wrapping so that
every process gets the same number of samples (the semantics of torch's
``DistributedSampler``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from imgtriage.errors import ConfigError


def balanced_quotas(counts: np.ndarray | list[int], max_repeat: int,
                    total: int | None = None) -> np.ndarray:
    """Draws per class for one balanced epoch of ``total`` draws (default: sum of counts).

    Each class gets ``min(max_repeat * n_c, t)`` with ``t`` chosen so the quotas sum to
    ``total`` (rounded by largest remainder, never above the cap).

    Example:
        >>> balanced_quotas([100, 20, 5], max_repeat=4).tolist()
        [53, 52, 20]
    """
    n = np.asarray(counts, dtype=np.int64)
    total = int(n.sum()) if total is None else int(total)
    caps = n * int(max_repeat)
    if total > caps.sum():
        raise ConfigError(f"an epoch of {total} draws cannot respect --max-repeat {max_repeat}")
    present = np.flatnonzero(n > 0)
    left, order = float(total), present[np.argsort(caps[present], kind="stable")]
    quota = np.zeros(len(n), dtype=np.float64)
    for i, c in enumerate(order):  # water-filling: smallest caps are filled first
        share = left / (len(order) - i)
        quota[c] = min(float(caps[c]), share)
        left -= quota[c]
    whole = np.floor(quota + 1e-9).astype(np.int64)
    rest = total - int(whole.sum())
    frac = np.where(whole < caps, quota - whole, -1.0)
    for c in sorted(present, key=lambda c: (-frac[c], c))[:rest]:
        whole[c] += 1
    return whole


class TrainSampler(Sampler[int]):
    """Indices of one epoch for this process: shuffled or class-balanced, then sharded.

    Example:
        >>> labels = [0] * 8 + [1] * 2
        >>> s = TrainSampler(labels, balanced=True, max_repeat=3, seed=1)
        >>> s.set_epoch(0)
        >>> np.bincount([labels[i] for i in s]).tolist()
        [5, 5]
    """

    def __init__(self, labels: np.ndarray | list[int], *, seed: int = 0, shuffle: bool = True,
                 balanced: bool = False, max_repeat: int = 4, num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.seed, self.shuffle, self.balanced = int(seed), shuffle, balanced
        self.max_repeat, self.num_replicas, self.rank = int(max_repeat), num_replicas, rank
        self.epoch = 0
        counts = np.bincount(self.labels) if len(self.labels) else np.zeros(0, np.int64)
        self.quotas = balanced_quotas(counts, self.max_repeat) if balanced else counts
        self.per_replica = math.ceil(len(self.labels) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` yields (call once per epoch)."""
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The global (unsharded) order of an epoch."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, 0x5A])
        if not self.balanced:
            n = len(self.labels)
            return rng.permutation(n) if self.shuffle else np.arange(n)
        picks = []
        for c, q in enumerate(self.quotas):
            members = np.flatnonzero(self.labels == c)
            if q == 0 or len(members) == 0:
                continue
            full, part = divmod(int(q), len(members))
            picks += [members] * full + [rng.choice(members, part, replace=False)]
        order = np.concatenate(picks)
        return rng.permutation(order) if self.shuffle else np.sort(order, kind="stable")

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        total = self.per_replica * self.num_replicas
        if total > len(order):  # pad by wrapping so every rank has the same length
            order = np.concatenate([order, np.resize(order, total - len(order))])
        return iter(order[self.rank:total:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_replica

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "balanced": self.balanced,
                "max_repeat": self.max_repeat, "shuffle": self.shuffle,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch (and check the sampler is configured as when it was saved)."""
        for key in ("seed", "balanced", "max_repeat", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(f"checkpoint sampler has {key}={state.get(key)!r}, this run "
                                  f"{getattr(self, key)!r}; resume with the same settings")
        self.epoch = int(state["epoch"])
