"""Each image through a frozen pretrained backbone once: embeddings cached on disk.

The cache key of one embedding is (the file's content sha256, the backbone: timm arch + the
weights' sha256 + input channels, the preprocessing: every field of the
:class:`~imgtriage.data.PreprocessSpec`); change any of them and the embedding is computed
again. Entries are ``.npy`` files written atomically, so concurrent runs can share a cache.
The cache lives in ``--embed-cache`` (default ``$IMGTRIAGE_CACHE`` or
``~/.cache/imgtriage``, subfolder ``embeddings``).

Example:
    >>> store = EmbeddingStore(None, "tf_efficientnet_lite0|abc|3", PreprocessSpec())
    >>> store.get("0" * 64) is None
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtriage.data.discovery import Sample
from imgtriage.data.preprocess import PreprocessSpec, load_input
from imgtriage.errors import ConfigError, ImageReadError
from imgtriage.io import Defect, sha256_file

EMBED_VERSION = 2  # bump when the way embeddings are computed changes (2: TIFF alpha)


def cache_root(setting: str) -> Path | None:
    """``--embed-cache``: auto (the user cache folder), off, or a folder."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting)
    base = os.environ.get("IMGTRIAGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imgtriage")
    return Path(base) / "embeddings"


class EmbeddingStore:
    """Embeddings of one (backbone, preprocessing) pair, by file content hash."""

    def __init__(self, root: Path | None, backbone: str, spec: PreprocessSpec) -> None:
        key = json.dumps({"v": EMBED_VERSION, "backbone": backbone,
                          "preprocess": spec.to_dict()}, sort_keys=True, default=str)
        self.key = hashlib.sha256(key.encode()).hexdigest()[:24]
        self.dir = None if root is None else Path(root) / self.key

    def _path(self, digest: str) -> Path | None:
        return None if self.dir is None else self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        path = self._path(digest)
        if path is None or not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a torn or foreign file: compute it again
            return None

    def put(self, digest: str, value: np.ndarray) -> None:
        path = self._path(digest)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(value, np.float32), allow_pickle=False)
        os.replace(tmp, path)


@dataclass
class Embedded:
    """Embeddings of one split (rows aligned with ``y``), its defects and cache counts."""

    x: np.ndarray
    y: np.ndarray
    defects: list[Defect] = field(default_factory=list)
    hits: int = 0
    computed: int = 0


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features, i.e. the classifier's input (timm models)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class _Pooled(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model, x)


class Embedder:
    """Pooled features of a batch: through ONNX Runtime when it is installed and its output
    matches PyTorch's on the first batch (several times faster for small CNNs on shared CPU
    cores), else through PyTorch. ``backend`` says which one runs."""

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        self.model = model.eval()
        self.threads = threads or torch.get_num_threads()
        self.session: object | None = None
        self.backend = "pending"

    def _torch(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pooled_features(self.model, torch.from_numpy(x)).float().numpy()

    def _try_onnx(self, x: np.ndarray) -> np.ndarray:
        """Export on the first batch; keep ONNX Runtime when it agrees with PyTorch."""
        import importlib.util
        import io
        import warnings

        ref = self._torch(x[:2])
        self.backend = "torch"
        if importlib.util.find_spec("onnxruntime") is None:
            return np.concatenate([ref, self._torch(x[2:])]) if len(x) > 2 else ref
        try:
            from imgtriage.predict.ort_session import open_session, session_options

            buf = io.BytesIO()
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Pooled(self.model).eval(), (torch.from_numpy(x[:1]),), buf,
                                  dynamo=False, input_names=["x"], output_names=["f"],
                                  dynamic_axes={"x": {0: "n"}, "f": {0: "n"}},
                                  opset_version=17)
            sess = open_session(buf.getvalue(), session_options(self.threads))
            got = sess.run(["f"], {"x": np.ascontiguousarray(x[:2])})[0]
            if np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max())):
                self.session, self.backend = sess, "onnxruntime"
        except Exception:  # any export/runtime failure: PyTorch computes them all
            self.session = None
        self.model.eval()  # the exporter restores the wrapper's mode; the backbone stays eval
        return self(x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.backend == "pending":
            return self._try_onnx(x)
        if self.session is not None:
            return self.session.run(["f"], {"x": x})[0]  # type: ignore[attr-defined]
        return self._torch(x)


def _decode(sample: Sample, spec: PreprocessSpec) -> np.ndarray | Defect:
    try:
        return load_input(sample.path, spec)[0]
    except ImageReadError as exc:
        return exc.defect


def _digest(sample: Sample) -> str | Defect:
    try:
        return sha256_file(sample.path)
    except OSError as exc:
        return Defect(str(sample.path), "unreadable", f"cannot read the file: {exc}")


def embed_samples(model: nn.Module | Embedder, samples: Sequence[Sample], classes: Sequence[str],
                  spec: PreprocessSpec, store: EmbeddingStore, *, batch_size: int = 32,
                  workers: int = 2, progress: bool = False, label: str = "train"
                  ) -> Embedded:
    """Embeddings of ``samples`` (cached ones read, the rest computed and stored).

    Unreadable files become defects, never silently skipped.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise ConfigError(f"labels {unknown} are not among the classes {list(classes)}")
    embed = model if isinstance(model, Embedder) else Embedder(model)
    rows: list[np.ndarray | None] = [None] * len(samples)
    defects: list[Defect] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(_digest, samples))
        todo = []
        for i, d in enumerate(digests):
            if isinstance(d, Defect):
                continue
            rows[i] = store.get(d)
            if rows[i] is None:
                todo.append(i)
        hits = sum(r is not None for r in rows)
        with _bar(progress, f"embedding {len(todo)} {label} images", len(todo)) as (bar, task):
            for start in range(0, len(todo), batch_size):
                part = todo[start:start + batch_size]
                got = list(pool.map(lambda i: _decode(samples[i], spec), part))
                ok = [(i, x) for i, x in zip(part, got, strict=True) if not isinstance(x, Defect)]
                defects += [x for x in got if isinstance(x, Defect)]
                if ok:
                    feats = embed(np.stack([x for _, x in ok]))
                    for (i, _), f in zip(ok, feats, strict=True):
                        rows[i] = f
                        store.put(digests[i], f)  # type: ignore[arg-type]
                bar.update(task, advance=len(part))
    defects += [d for d in digests if isinstance(d, Defect)]
    keep = [i for i, r in enumerate(rows) if r is not None]
    dim = rows[keep[0]].shape[0] if keep else 0  # type: ignore[union-attr]
    x = np.stack([rows[i] for i in keep]) if keep else np.zeros((0, dim), np.float32)
    y = np.asarray([index[samples[i].label] for i in keep], np.int64)
    return Embedded(x.astype(np.float32), y, defects, hits, len(keep) - hits)


class _bar:
    """A rich progress bar over images (nothing shown when disabled)."""

    def __init__(self, enabled: bool, what: str, total: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{what}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} img"),
                                 TimeRemainingColumn(), disable=not enabled or total == 0,
                                 transient=False)
        self.total = total

    def __enter__(self):
        self.progress.__enter__()
        return self.progress, self.progress.add_task("embed", total=self.total)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)
