"""Where training batches come from: an in-memory cache, or files streamed by workers.

Both sources take the same order of indices (from :class:`~imgtriage.data.samplers.
TrainSampler`) and yield ``(x, y)`` CPU tensors, so the loop does not know which one it runs
on. Augmentation happens in the loop on the batch tensor, identically for both.

- :class:`ArraySource` holds decoded inputs (the default when the data fits in memory):
  indexing a batch costs microseconds.
- :class:`FileSource` decodes files with :func:`~imgtriage.data.load_input` in DataLoader
  worker processes (JPEG draft decoding included), pinned memory on CUDA; for fusion models
  it also scales each file's raw features (from the same decode) with the fitted
  standardizer. A file that cannot be decoded is dropped from its batch and recorded in
  ``defects`` (the run writes them to ``defects.json``): never skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgtriage.data.discovery import Sample
from imgtriage.data.loaders import decoder_mp_context
from imgtriage.data.preprocess import PreprocessSpec, load_input
from imgtriage.errors import DataError, ImageReadError
from imgtriage.io import Defect

Batch = tuple[torch.Tensor, ...]  # (x, y) or (x, y, features)


class ArraySource:
    """Decoded inputs in memory; ``batches(order, bs)`` slices them. With ``features``
    (standardised, one row per input: fusion models) each batch is ``(x, y, features)``.

    Example:
        >>> src = ArraySource(np.zeros((5, 1, 8, 8), np.float32), np.arange(5) % 2)
        >>> [len(y) for _, y in src.batches([4, 3, 2, 1, 0], 2)]
        [2, 2, 1]
    """

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 features: np.ndarray | torch.Tensor | None = None) -> None:
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y).long()
        self.features = None if features is None else torch.as_tensor(features).float()
        if self.features is not None and len(self.features) != len(self.y):
            raise DataError(f"{len(self.features)} feature rows for {len(self.y)} images")
        self.labels = self.y.numpy()
        self.defects: list[Defect] = []

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, order: Iterable[int], batch_size: int) -> Iterator[Batch]:
        idx = torch.as_tensor(list(order), dtype=torch.long)
        for part in idx.split(batch_size):
            if self.features is None:
                yield self.x[part], self.y[part]
            else:
                yield self.x[part], self.y[part], self.features[part]


class _FileDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], labels: np.ndarray, spec: PreprocessSpec,
                 features: Any = None, extras: dict[str, dict[str, str]] | None = None
                 ) -> None:
        self.samples, self.labels, self.spec = list(samples), labels, spec
        self.features, self.extras = features, extras or {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, Defect | None, Any]:
        path = self.samples[i].path
        try:
            x, meta = load_input(path, self.spec)
        except ImageReadError as exc:
            return None, int(self.labels[i]), exc.defect, None
        return x, int(self.labels[i]), None, self._feature_row(meta, path)

    def _feature_row(self, meta: dict[str, Any], path: str) -> np.ndarray | None:
        """The standardised feature row of a fusion model's input (from the same decode)."""
        if self.features is None:
            return None
        from imgtriage.data.features import with_extra_columns
        from imgtriage.data.preprocess import RAW_FEATURES

        raw = meta[RAW_FEATURES]
        if self.spec.features is not None and self.spec.features.extra_columns:
            raw = with_extra_columns(raw, self.spec.features, self.extras.get(str(Path(path)))
                                     or self.extras.get(path))
        return self.features.transform([raw])[0].astype(np.float32)


def _collate(items: list[tuple[Any, int, Defect | None, Any]]) -> tuple[Any, ...]:
    good = [(x, y, f) for x, y, d, f in items if d is None]
    bad = [d for _, _, d, _ in items if d is not None]
    if not good:
        return None, None, None, bad
    feats = None if good[0][2] is None else torch.from_numpy(np.stack([f for *_, f in good]))
    return (torch.from_numpy(np.stack([x for x, _, _ in good])),
            torch.tensor([y for _, y, _ in good], dtype=torch.long), feats, bad)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def default_workers(local_world_size: int = 1) -> int:
    """Decoding processes per training process: the cores left after the compute one."""
    return max(0, (os.cpu_count() or 1) // max(1, local_world_size) - 1)


class FileSource:
    """Files decoded every epoch by ``workers`` processes (0: in this process)."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], spec: PreprocessSpec,
                 *, workers: int = 0, pin_memory: bool = False, features: Any = None,
                 extras: dict[str, dict[str, str]] | None = None) -> None:
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({s.label for s in samples} - set(index))
        if unknown:
            raise DataError(f"labels {unknown} are not among the classes {list(classes)}")
        self.labels = np.asarray([index[s.label] for s in samples], np.int64)
        self.dataset = _FileDataset(samples, self.labels, spec, features, extras)
        self.workers, self.pin_memory = workers, pin_memory
        self.defects: list[Defect] = []
        self._seen: set[str] = set()
        self._loaders: dict[tuple[int, int], DataLoader] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _loader(self, order: Iterable[int], batch_size: int) -> DataLoader:
        key = (id(order), batch_size)
        if key not in self._loaders:  # one loader per sampler: workers persist across epochs
            # its own generator: creating worker seeds must not consume the global RNG
            # (dropout draws from it), so streaming and caching train identically
            self._loaders[key] = DataLoader(
                self.dataset, batch_size=batch_size, sampler=order, num_workers=self.workers,
                generator=torch.Generator().manual_seed(len(self._loaders)),
                collate_fn=_collate, pin_memory=self.pin_memory,
                persistent_workers=self.workers > 0, worker_init_fn=_worker_init,
                prefetch_factor=4 if self.workers > 0 else None,
                multiprocessing_context=decoder_mp_context() if self.workers > 0 else None)
        return self._loaders[key]

    def batches(self, order: Iterable[int], batch_size: int) -> Iterator[Batch]:
        for x, y, feats, bad in self._loader(order, batch_size):
            for d in bad:
                if d.path not in self._seen:
                    self._seen.add(d.path)
                    self.defects.append(d)
            if x is not None:
                yield (x, y) if feats is None else (x, y, feats)
