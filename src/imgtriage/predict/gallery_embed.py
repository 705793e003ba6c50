"""Files to gallery embeddings: the pretrained encoder of a gallery, and embedding in batches.

A gallery needs no training when its encoder is a pretrained backbone
(:func:`pretrained_encoder`: the registered ImageNet weights, the preprocessing with *their*
normalisation and input size). Files are embedded by :func:`embed_paths` a batch at a time
(decoded on a few threads, never all held as model inputs at once, so enrolling thousands of
photos at 224 px stays within memory), by the same computation prediction runs: the encoder's
verified ONNX graph when the bundle has one (:func:`encoder_runner`).

Example:
    >>> enc, spec, plan, kwargs = pretrained_encoder("efficientnet_lite0")  # doctest: +SKIP
    >>> spec.mean, spec.size  # doctest: +SKIP
    ((0.5, 0.5, 0.5), (224, 224))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from imgtriage.data.preprocess import PreprocessSpec, load_input
from imgtriage.errors import ImageReadError, WeightsUnavailableError
from imgtriage.io import Defect
from imgtriage.models.pretrained import EXTRA_LINE, WeightsPlan, resolve_weights

__all__ = ["embed_paths", "encoder_runner", "pretrained_encoder"]

Runner = Callable[[np.ndarray], np.ndarray]


def pretrained_encoder(backbone: str = "efficientnet_lite0", img_size: int | None = None,
                       scaling: str = "dtype"
                       ) -> tuple[Any, PreprocessSpec, WeightsPlan, dict[str, Any]]:
    """``(encoder, preprocessing, weights plan, encoder kwargs)`` of a gallery on the
    installed pretrained ``backbone``: 3 input channels (grey images are replicated), the
    weights' own mean/std, ``img_size`` (default: the size the weights were trained at).
    Raises :class:`WeightsUnavailableError` naming the extra when they are not installed."""
    from imgtriage.models.gallery_encoder import build_gallery_encoder

    plan = resolve_weights(backbone, "auto")
    if not plan.active:
        raise WeightsUnavailableError(
            f"the pretrained gallery encoder {backbone} needs its ImageNet weights: run "
            f"`{EXTRA_LINE}`, or train an encoder on your images with --encoder episodic")
    side = int(img_size or plan.input_size or 224)
    spec = PreprocessSpec.default_for(3, (side, side), scaling=scaling, mean=plan.mean,
                                      std=plan.std)
    kwargs: dict[str, Any] = {}
    return build_gallery_encoder(backbone, 3, kwargs, pretrained=plan), spec, plan, kwargs


def encoder_runner(encoder: Any = None, graph: bytes | None = None,
                   threads: int | None = None) -> Runner:
    """``(N, C, h, w) -> (N, D)`` embeddings: through ONNX Runtime on ``graph`` (the
    encoder's graph a bundle stores) when given, else through ``encoder`` in torch."""
    if graph is not None:
        from imgtriage.predict.ort_session import open_session, session_options, usable_cores

        session = open_session(graph, session_options(threads or usable_cores()))
        return lambda x: session.run(["embedding"], {"input": np.ascontiguousarray(
            x, dtype=np.float32)})[0]
    if encoder is None:
        raise ValueError("encoder_runner needs an encoder or its ONNX graph")
    from imgtriage.models.gallery import embed

    return lambda x: embed(encoder, np.ascontiguousarray(x, dtype=np.float32))


def _decode(path: str | os.PathLike[str], spec: PreprocessSpec) -> np.ndarray | Defect:
    try:
        return load_input(path, spec)[0]
    except ImageReadError as exc:
        return exc.defect


def embed_paths(run: Runner, paths: Sequence[str | os.PathLike[str]], spec: PreprocessSpec,
                *, workers: int | None = None, batch_size: int = 32, progress: bool = False,
                label: str = "images") -> tuple[np.ndarray, list[int], list[Defect]]:
    """Embed files a batch at a time: ``(embeddings of the readable files, their indices in
    paths, the defects of the others)``. Nothing is skipped silently: every unreadable file
    is a defect."""
    rows: list[np.ndarray] = []
    kept: list[int] = []
    defects: list[Defect] = []
    threads = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool, _Bar(progress, label,
                                                               len(paths)) as bar:
        for start in range(0, len(paths), batch_size):
            part = range(start, min(start + batch_size, len(paths)))
            got = list(pool.map(lambda i: _decode(paths[i], spec), part))
            ok = [(i, x) for i, x in zip(part, got, strict=True) if not isinstance(x, Defect)]
            defects += [x for x in got if isinstance(x, Defect)]
            if ok:
                rows.append(np.asarray(run(np.stack([x for _, x in ok])), np.float32))
                kept += [i for i, _ in ok]
            bar.advance(len(part))
    emb = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return emb, kept, defects


class _Bar:
    """A rich progress bar over images (nothing shown when disabled)."""

    def __init__(self, enabled: bool, what: str, total: int) -> None:
        self.enabled = enabled and total > 0
        self.what, self.total = what, total

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn(f"[bold]embedding {self.what}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total} img"),
                                     TimeRemainingColumn(), console=Console(stderr=True))
            self.progress.__enter__()
            self.task = self.progress.add_task("embed", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)
