"""The training sampler on deliberately imbalanced labels: quotas, repeat caps, sharding."""

from __future__ import annotations

import numpy as np
import pytest

from imgtriage.data.samplers import TrainSampler, balanced_quotas
from imgtriage.errors import ConfigError

COUNTS = np.array([100, 20, 5])
LABELS = np.repeat(np.arange(3), COUNTS)


def test_quotas_water_fill_under_the_repeat_cap():
    # 125 draws: class 2 is capped at 4 x 5 = 20, the other 105 split evenly
    assert balanced_quotas(COUNTS, max_repeat=4).tolist() == [53, 52, 20]
    # a loose cap gives equal shares
    assert balanced_quotas(COUNTS, max_repeat=100).tolist() == [42, 42, 41]
    # cap 1: nothing repeats, so the epoch is the data itself
    assert balanced_quotas(COUNTS, max_repeat=1).tolist() == COUNTS.tolist()


def _epoch(sampler: TrainSampler, epoch: int) -> np.ndarray:
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64)


def test_balanced_epoch_frequencies_and_repeat_cap():
    s = TrainSampler(LABELS, seed=3, balanced=True, max_repeat=4)
    for epoch in range(3):
        idx = _epoch(s, epoch)
        assert len(idx) == len(LABELS) == len(s)
        assert np.bincount(LABELS[idx], minlength=3).tolist() == [53, 52, 20]
        reps = np.bincount(idx, minlength=len(LABELS))
        assert reps[LABELS == 2].tolist() == [4] * 5  # the minority: exactly at the cap
        assert set(reps[LABELS == 1].tolist()) <= {2, 3}  # 52 draws over 20 images
        assert reps[LABELS == 0].max() == 1  # the majority is subsampled, never repeated
        assert (reps[LABELS == 0] == 1).sum() == 53


def test_majority_subsets_change_between_epochs():
    s = TrainSampler(LABELS, seed=3, balanced=True, max_repeat=4)
    a, b = set(_epoch(s, 0)[:]), set(_epoch(s, 1)[:])
    assert {i for i in a if LABELS[i] == 0} != {i for i in b if LABELS[i] == 0}


def test_long_run_frequency_of_every_majority_image_is_even():
    s = TrainSampler(LABELS, seed=0, balanced=True, max_repeat=4)
    seen = sum(np.bincount(_epoch(s, e), minlength=len(LABELS)) for e in range(200))
    majority = seen[LABELS == 0] / 200
    assert abs(majority.mean() - 0.53) < 1e-9 and majority.std() < 0.06


def test_order_is_a_function_of_seed_and_epoch():
    a = TrainSampler(LABELS, seed=1, balanced=True)
    b = TrainSampler(LABELS, seed=1, balanced=True)
    assert (_epoch(a, 5) == _epoch(b, 5)).all()
    assert not (_epoch(a, 5) == _epoch(a, 6)).all()
    assert not (_epoch(a, 5) == _epoch(TrainSampler(LABELS, seed=2, balanced=True), 5)).all()


def test_plain_shuffle_is_a_permutation():
    s = TrainSampler(LABELS, seed=0)
    assert sorted(_epoch(s, 0).tolist()) == list(range(len(LABELS)))
    assert _epoch(TrainSampler(LABELS, shuffle=False), 0).tolist() == list(range(len(LABELS)))


@pytest.mark.parametrize("balanced", [False, True])
def test_shards_are_disjoint_equal_and_cover_the_epoch(balanced):
    shards = [TrainSampler(LABELS, seed=4, balanced=balanced, num_replicas=3, rank=r)
              for r in range(3)]
    parts = [_epoch(s, 2) for s in shards]
    assert len({len(p) for p in parts}) == 1 == len({len(s) for s in shards})
    glob = shards[0].epoch_order(2)
    padded = np.concatenate([glob, glob[:3 * len(parts[0]) - len(glob)]])
    merged = np.empty(3 * len(parts[0]), np.int64)
    for r, p in enumerate(parts):
        merged[r::3] = p
    assert (merged == padded).all()


def test_state_round_trip_and_mismatch():
    s = TrainSampler(LABELS, seed=7, balanced=True, max_repeat=3)
    s.set_epoch(9)
    t = TrainSampler(LABELS, seed=7, balanced=True, max_repeat=3)
    t.load_state_dict(s.state_dict())
    assert t.epoch == 9 and list(t) == list(s)
    with pytest.raises(ConfigError, match="max_repeat"):
        TrainSampler(LABELS, seed=7, balanced=True, max_repeat=2).load_state_dict(s.state_dict())
