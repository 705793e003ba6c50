"""ONNX Runtime on CPU: the default backend when a bundle holds ``model.onnx``.

The graph takes exactly what :func:`imgtriage.data.preprocess.to_input` returns (already
normalised), so every backend shares the one preprocessing function.

Threads: by default one session with ``intra_op`` threads = the cores this process may use,
and thread spinning off, because decoding threads share those cores. Small graphs are
overhead-bound: for them (``sessions="auto"``) the backend opens one single-thread session per
core and runs the halves of each batch side by side (ONNX Runtime releases the GIL), which
beats one two-thread session on small CNNs.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imgtriage.bundle import Bundle
from imgtriage.bundle.graph import FEATURES_INPUT, INT8_FILE, ONNX_FILE, OOD_SCORE_OUTPUT
from imgtriage.errors import BundleError, ConfigError, PredictionError, require
from imgtriage.predict.ort_session import open_session, session_options, usable_cores

# Graphs with fewer weight bytes than this count as "small" (overhead-bound) for sessions="auto".
SMALL_GRAPH_BYTES = 8_000_000
PRECISIONS = ("fp32", "int8")


def onnx_file_for(bundle: Bundle, precision: str | None = None) -> tuple[str, str]:
    """``(file name, precision)`` of the graph to run: ``precision`` or the bundle's default."""
    info = bundle.info.block("onnx") or {}
    precision = precision or info.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be fp32 or int8, got {precision!r} (--precision)")
    name = ONNX_FILE if precision == "fp32" else (info.get("int8") or {}).get("file", INT8_FILE)
    if not bundle.has_file(name):
        hint = (f"run `imgtriage export {bundle.path} --onnx --quantize static --calib DIR`"
                if precision == "int8" else f"run `imgtriage export {bundle.path} --onnx`")
        raise ConfigError(f"{bundle.path} has no {name}; {hint} first, or use "
                          "--backend torch")
    return name, precision

@dataclass(frozen=True)
class SessionLayout:
    """How a graph is run: ``sessions`` sessions of ``threads_each`` intra-op threads each
    (a batch split over them side by side), ``batch_size`` images per call."""

    sessions: int
    threads_each: int
    batch_size: int
    spinning: bool = False


def session_layout(model_bytes: int, threads: int, sessions: int | str = "auto",
                   spinning: bool = False) -> SessionLayout:
    """The layout :class:`OnnxBackend` uses for a graph of ``model_bytes`` weight bytes on
    ``threads`` threads: small (overhead-bound) graphs get one single-thread session per
    thread under ``sessions="auto"``; ORT CNNs gain little past ~16 images per call, small
    graphs like bigger batches.

    Example:
        >>> session_layout(400_000, 2)
        SessionLayout(sessions=2, threads_each=1, batch_size=64, spinning=False)
        >>> session_layout(20_000_000, 2).sessions
        1
    """
    if int(threads) < 1:
        raise ConfigError("num_threads must be >= 1 (--threads)")
    small = model_bytes < SMALL_GRAPH_BYTES
    if sessions == "auto":
        n = threads if small and threads > 1 else 1
    elif isinstance(sessions, int) and not isinstance(sessions, bool) and sessions >= 1:
        n = min(sessions, threads)
    else:
        raise ConfigError(f"sessions must be 'auto' or a positive integer, got {sessions!r}")
    return SessionLayout(n, max(1, threads // n), 64 if small else 16, spinning)


class SessionPool:
    """One graph opened as ``layout.sessions`` ONNX Runtime sessions; :meth:`run` splits a
    batch over them side by side (ONNX Runtime releases the GIL). What :class:`OnnxBackend`
    runs, and what the int8 speed check times (``predict.int8``)."""

    def __init__(self, graph: bytes, layout: SessionLayout) -> None:
        options = session_options(layout.threads_each, spinning=layout.spinning)
        self.sessions = [open_session(graph, options) for _ in range(layout.sessions)]
        first = self.sessions[0]
        self.input_name = first.get_inputs()[0].name
        # an image + feature (fusion) graph takes the standardised feature rows as well
        self.feature_input = next((i.name for i in first.get_inputs()
                                   if i.name == FEATURES_INPUT), None)
        self.output_names = [o.name for o in first.get_outputs()]
        n = len(self.sessions)
        self._threads = ThreadPoolExecutor(n, thread_name_prefix="ort") if n > 1 else None

    def _feed(self, x: np.ndarray, f: np.ndarray | None) -> dict[str, np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(x)}
        if self.feature_input is not None and f is not None:
            feed[self.feature_input] = np.ascontiguousarray(f)
        return feed

    def run(self, x: np.ndarray, names: list[str], f: np.ndarray | None = None
            ) -> list[np.ndarray]:
        """The outputs ``names`` (by name: graphs may carry more) for the batch ``x``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if f is not None:
            f = np.ascontiguousarray(f, dtype=np.float32)
        n = len(self.sessions)
        if self._threads is None or len(x) < 2 * n:
            return [np.asarray(o, dtype=np.float32)
                    for o in self.sessions[0].run(names, self._feed(x, f))]
        parts = np.array_split(x, n)
        fparts = np.array_split(f, n) if f is not None else [None] * n
        futures = [self._threads.submit(s.run, names, self._feed(p, fp))
                   for s, p, fp in zip(self.sessions, parts, fparts, strict=True)]
        outs = [fu.result() for fu in futures]
        return [np.concatenate([o[j] for o in outs]).astype(np.float32, copy=False)
                for j in range(len(names))]

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)


class OnnxBackend:
    """``(N, C, h, w) float32 -> (N, K) float32 logits`` with ONNX Runtime on CPU.

    Args:
        bundle: a loaded bundle holding ``model.onnx`` (and ``model.int8.onnx`` for int8).
        num_threads: compute threads in all (default: the usable cores).
        precision: ``fp32`` or ``int8``; default: what the export recorded in the manifest.
        sessions: ``"auto"``, or how many single-purpose sessions to split each batch over
            (1 = one session with ``num_threads`` threads).
        spinning: let idle ORT threads spin (faster only when nothing else needs the cores).

    Example:
        >>> backend = OnnxBackend(load_bundle("bundle"))  # doctest: +SKIP
        >>> backend(np.zeros((2, 3, 224, 224), np.float32)).shape  # doctest: +SKIP
        (2, 10)
    """

    name = "onnx"

    def __init__(self, bundle: Bundle, *, num_threads: int | None = None,
                 precision: str | None = None, sessions: int | str = "auto",
                 spinning: bool = False) -> None:
        require("onnxruntime", "onnx")
        self.file, self.precision = onnx_file_for(bundle, precision)
        self._bundle = bundle
        graph = bundle.verified_bytes(self.file)
        threads = int(num_threads or usable_cores())
        # the model's own size decides (not the in-graph OOD head's constants)
        head = int(((bundle.info.block("onnx") or {}).get("ood_score") or {}).get(
            "added_bytes", 0))
        self._layout = session_layout(len(graph) - head, threads, sessions, spinning)
        self._pool = self._open_pool(graph)
        self._plain: SessionPool | None = None  # without the OOD head, opened when first needed
        self._lock = threading.Lock()
        self._feature_input = self._pool.feature_input
        self._names = self._pool.output_names
        self._outputs = ["logits" if "logits" in self._names else self._names[0]]
        self.threads = threads
        self.batch_size = self._layout.batch_size

    def _open_pool(self, graph: bytes) -> SessionPool:
        path = self._bundle.path
        try:
            return SessionPool(graph, self._layout)
        except Exception as exc:  # ORT raises its own exception types for invalid graphs
            raise BundleError(f"{path}: ONNX Runtime cannot load {self.file}: "
                              f"{str(exc).splitlines()[0]}; re-export it with `imgtriage "
                              f"export {path} --onnx`") from exc

    def _pool_for(self, names: list[str]) -> SessionPool:
        """The sessions that compute ``names`` and nothing more: ONNX Runtime runs every node
        of a graph whatever outputs are asked for, so runs without the OOD score (TTA views,
        rules without an OOD part) use the same graph less its OOD head."""
        if OOD_SCORE_OUTPUT in names or not self.has_ood_score:
            return self._pool
        with self._lock:
            if self._plain is None:
                from imgtriage.predict.ood_graph import without_ood_score

                graph = self._bundle.verified_bytes(self.file)
                self._plain = self._open_pool(without_ood_score(graph))
        return self._plain

    @property
    def num_sessions(self) -> int:
        return self._layout.sessions

    @property
    def has_features(self) -> bool:
        """Whether the graph also emits the penultimate features (the OOD scorer's input)."""
        return "features" in self._names

    def _all(self, x: np.ndarray, names: list[str], f: np.ndarray | None = None
             ) -> list[np.ndarray]:
        if self._feature_input is not None and f is None:
            raise PredictionError(f"{self.file} is an image + feature model's graph: pass "
                                  "the scaled features of the inputs too")
        return self._pool_for(names).run(x, names, f)

    def __call__(self, x: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Logits; ``features`` (N, F) go to an image + feature (fusion) graph."""
        return self._all(x, self._outputs, features)[0]

    def with_features(self, x: np.ndarray, features: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and penultimate features from the same graph run (for OOD scores)."""
        if not self.has_features:
            raise BundleError(f"{self.file} has no 'features' output, which this bundle's OOD "
                              "rule needs; re-export it (imgtriage export BUNDLE --onnx) or "
                              "use --backend torch")
        logits, feats = self._all(x, [self._outputs[0], "features"], features)
        return logits, feats

    @property
    def has_ood_score(self) -> bool:
        """Whether the graph also computes the OOD score (``predict.ood_graph``)."""
        return OOD_SCORE_OUTPUT in self._names

    def with_ood_score(self, x: np.ndarray, features: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and the in-graph OOD score from one run (split over the sessions like the
        model): the scorer costs a few operators instead of a NumPy pass after the run."""
        if not self.has_ood_score:
            raise BundleError(f"{self.file} has no {OOD_SCORE_OUTPUT!r} output; score its "
                              "'features' output instead (with_features)")
        logits, scores = self._all(x, [self._outputs[0], OOD_SCORE_OUTPUT], features)
        return logits, scores.astype(np.float64)

    def close(self) -> None:
        for pool in (self._pool, self._plain):
            if pool is not None:
                pool.close()
