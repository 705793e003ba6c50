"""int8 graphs only when proven: quantise on training images, judge on held-out ones.

``train`` does this by default (``--quantize auto``), ``export --quantize static`` on demand.

The rule (:func:`judge`): an int8 graph becomes a bundle's default only when, on held-out
labelled validation images (never the calibration images, which come from the training split),
its top-1 class agrees with fp32's on at least ``MIN_AGREEMENT`` (99%) of them AND its top-1
accuracy is at most ``MAX_ACCURACY_DROP`` (0.5 points) below fp32's, over at least
``MIN_CHECK_IMAGES`` (30) images. Otherwise the bundle keeps fp32 and its manifest
(``onnx.int8.refused``) says why; ``predict``/``serve`` print it. A refused graph stays in the
bundle so ``--precision int8`` can still ask for it explicitly.

What the rule can see depends on ``n``, the number of check images: below 100 images, 99%
agreement means no disagreement at all, and 0 disagreements in 30 images still allow a true
disagreement rate of up to 9.5% (one-sided 95%). So every verdict also records
``disagreement_upper95``, the Clopper-Pearson upper bound on the disagreement rate, for a
reader to judge how strong the evidence was; it is reported, not part of the rule (whose
bounds are the ones the issue set). Top-1 agreement alone is not what a user sees:
probabilities move by up to ``max_abs_dprob`` (recorded) and the OOD features move too, which
can carry an image across a confidence or OOD threshold fitted on fp32 outputs. So the check
also runs the bundle's default decision rule (temperature, confidence thresholds, the OOD
scorer: :class:`DecisionRule`) on both graphs' outputs, and int8 must also give the same
decision (the same class answered, or an abstention) on at least ``MIN_AGREEMENT`` of the
images (``decision_agreement``).

Exact is not enough for a default: an int8 graph that is no faster than fp32 is only a less
exact copy of it. So ``train --quantize auto`` also times both graphs on the check images as
the default backend runs each of them (:func:`measure_speed`: its session layout, this
machine's cores, 3 interleaved rounds) and wants int8 at ``MIN_SPEEDUP`` (1.1x) fp32's
images/s at least; ``--quantize static`` (and ``export --quantize``) record the ratio without
the condition. On this project's 2-core hosts int8 ran 1.6x fp32 on a 28-px Fashion-MNIST
crop_cnn, 2.3x on MSTAR's 48-px deep_cnn, 1.3x on EfficientNet-Lite0 at 160 px
(``bench/bench_int8_speed.py``); in one plain 2-thread session with ONNX Runtime's QDQ
propagation on, the Fashion model's int8 was 0.8x (what :mod:`~imgtriage.predict.ort_session`
disables), which is why the timing must run the graphs the way prediction does.

Quantisation modes:

- ``static``: int8 QDQ, per-channel weights, activations calibrated on training images.
  About 2x fp32 speed for CNNs on AVX2. Three parts of the graph stay fp32
  (:data:`STATIC_RECIPE`): the first weighted layers (those reading the image: a CNN's stem
  convolution, whose few input channels and raw pixel range quantise worst), the last ones
  (those computing the logits: the classifier) and the graph outputs themselves (the
  quantiser would end them with a Quantize/Dequantize pair that rounds the logits to 256
  levels of their calibration range, flipping near ties). Measured on the demo's
  Fashion-MNIST crop_cnn (540 held-out images): top-1 agreement 98.1% -> 100%, mean logit
  error 4x smaller; the cost is those layers' fp32 time (docs/benchmarks.md, issue 16).
  A fourth part stays fp32 too: the ``features`` branch, every node the logits do not
  depend on (the stage statistics of the OOD scorer, their log-compression, the in-graph OOD
  head). Quantised, the statistics of channels with small activations moved by up to 2.7
  standard deviations: on a 28-px Fashion-MNIST model the OOD rule then accepted 13% of
  validation images instead of 95%, and int8 was refused on 36% same decisions; fp32 there,
  98.8% (docs/benchmarks.md, issue 15, session 9). They are cheap element-wise and
  reduction nodes: quantising them saved nothing.
- ``dynamic``: only MatMul/Gemm are quantised; for CNNs it is *slower* than fp32. Meant for
  transformer-style models.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle.graph import INT8_FILE
from imgtriage.bundle.store import sha256_bytes
from imgtriage.errors import require
from imgtriage.predict.ort_session import run_outputs, softmax

FP32_PARTS = ("stem", "classifier", "features", "outputs")
STATIC_RECIPE = ("QDQ, U8 activations (MinMax) x S8 per-channel 7-bit weights; first and last "
                 "weighted layers, the features branch and graph outputs fp32")
MAX_ACCURACY_DROP = 0.005  # 0.5 points of top-1 accuracy
MIN_AGREEMENT = 0.99
MIN_CHECK_IMAGES = 30
QUANT_MODES = ("static", "dynamic")
MIN_SPEEDUP = 1.10  # int8 must run >= 1.1x fp32's images/s to be the default (--quantize auto)
SPEED_ROUNDS = 3
SPEED_MIN_S = 0.2  # each timed measurement runs its images this long at least


@dataclass(frozen=True)
class LabelledInputs:
    """Model inputs ``x`` (N, C, h, w) and their class ids (None when unknown)."""

    x: np.ndarray
    labels: np.ndarray | None


@dataclass(frozen=True)
class SpeedCheck:
    """int8's images per second over fp32's, the graphs alone, on the machine that judged it:
    the median of ``rounds`` interleaved within-round ratios (``low``-``high``), each graph run
    as :class:`~imgtriage.predict.onnx_backend.OnnxBackend` runs it by default (its sessions,
    threads and batch size)."""

    ratio: float
    low: float
    high: float
    rounds: int
    images: int
    threads: int
    layout: str

    def text(self) -> str:
        return (f"int8 runs at {self.ratio:.2f}x fp32's speed on the machine that judged it "
                f"(graphs alone, median of {self.rounds} interleaved rounds, "
                f"{self.low:.2f}-{self.high:.2f}; {self.images} images, {self.threads} "
                f"thread(s), {self.layout})")


@dataclass(frozen=True)
class QuantCheck:
    """How the int8 graph compares with fp32 on held-out images, and the verdict."""

    mode: str
    n_calib: int
    n_images: int
    agreement: float
    max_abs_dprob: float
    accuracy_fp32: float | None
    accuracy_int8: float | None
    accepted: bool
    reason: str
    disagreement_upper95: float = 1.0
    decision_agreement: float | None = None
    recipe: str = ""
    speed: SpeedCheck | None = None

    def summary(self) -> str:
        text = (f"int8 {self.mode} (calibrated on {self.n_calib} training images) vs fp32 on "
                f"{self.n_images} held-out images: top-1 agreement {self.agreement:.1%} "
                f"(disagreement <= {self.disagreement_upper95:.1%} at 95% confidence), max "
                f"|Δprob| {self.max_abs_dprob:.4f}")
        if self.decision_agreement is not None:
            text += f", same default decision {self.decision_agreement:.1%}"
        if self.accuracy_fp32 is not None:
            text += (f", accuracy fp32 {self.accuracy_fp32:.1%} / int8 "
                     f"{self.accuracy_int8:.1%}")
        verdict = "int8 is the default" if self.accepted else "fp32 kept"
        return f"{text} -> {verdict}: {self.reason}"

    def manifest_block(self, graph: bytes) -> dict[str, Any]:
        """The manifest's ``onnx.int8`` entry: file, hash, numbers, and accepted/refused."""
        block = {"file": INT8_FILE, "sha256": sha256_bytes(graph), **asdict(self)}
        block["accepted" if self.accepted else "refused"] = self.reason
        return block


@dataclass(frozen=True)
class DecisionRule:
    """A bundle's default decision rule (its manifest's ``decision``) and, when the rule
    refuses out-of-distribution inputs, the fitted scorer's arrays (``ood.safetensors``)."""

    decision: dict[str, Any]
    ood_arrays: dict[str, np.ndarray] | None = None

    @property
    def needs_features(self) -> bool:
        """Whether the rule scores the graph's ``features`` output (an OOD rule that refuses)."""
        ood = self.decision.get("ood")
        return bool(ood and self.decision.get("abstain") and self.ood_arrays is not None)

    def outcomes(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """Each image's decision under the rule: the class answered, or -1 for an abstention.
        The OOD score comes from the same graph's ``features`` (what predict uses)."""
        from imgtriage.evaluate import DecisionPolicy
        from imgtriage.evaluate.ood import scorer_from_rule

        policy = DecisionPolicy.from_dict(self.decision)
        scores = None
        if self.needs_features and policy.ood is not None and self.ood_arrays is not None:
            scores = scorer_from_rule(policy.ood, self.ood_arrays).score(features)
        d = policy.decide(logits.astype(np.float64), scores)
        return np.where(d.abstained, -1, d.class_id)


def judge(agreement: float, acc_fp32: float | None, acc_int8: float | None,
          n_images: int, decisions: float | None = None, speed: SpeedCheck | None = None,
          need_speed: bool = False) -> tuple[bool, str]:
    """The acceptance rule: ``(accepted, why)``; ``decisions`` is the share of images on which
    the bundle's default rule decides the same (None: not measured); ``speed``: the measured
    speed ratio, which must reach ``MIN_SPEEDUP`` when ``need_speed`` (``--quantize auto``: an
    int8 graph that is no faster is only a less exact copy of fp32).

    Example:
        >>> judge(0.995, 0.90, 0.898, 400)[0]
        True
        >>> judge(0.962, 0.90, 0.90, 400)
        (False, 'agreement 96.2% < 99% on 400 held-out images')
    """
    if n_images < MIN_CHECK_IMAGES:
        return False, (f"only {n_images} held-out images to check on (need "
                       f"{MIN_CHECK_IMAGES}); give more validation images")
    if acc_fp32 is None or acc_int8 is None:
        return False, ("the check images have no labels, so the accuracy drop cannot be "
                       "measured; check on class folders or a splits CSV")
    drop = (acc_fp32 - acc_int8) * 100
    if agreement < MIN_AGREEMENT:
        return False, (f"agreement {agreement:.1%} < {MIN_AGREEMENT:.0%} on {n_images} "
                       "held-out images")
    if drop > MAX_ACCURACY_DROP * 100 + 1e-9:
        return False, (f"accuracy drops {drop:.2f} points (> {MAX_ACCURACY_DROP * 100:.1f}) on "
                       f"{n_images} held-out images")
    if decisions is not None and decisions < MIN_AGREEMENT:
        return False, (f"the default rule decides differently (class or abstention) on "
                       f"{1 - decisions:.1%} > {1 - MIN_AGREEMENT:.0%} of {n_images} held-out "
                       "images")
    same = f", same default decision on {decisions:.1%}" if decisions is not None else ""
    proven = (f"agreement {agreement:.1%} >= {MIN_AGREEMENT:.0%}, accuracy "
              f"{acc_fp32:.1%} -> {acc_int8:.1%} ({-drop:+.2f} points){same} on "
              f"{n_images} held-out images")
    if speed is None:
        return True, proven
    if need_speed and speed.ratio < MIN_SPEEDUP:
        return False, (f"as exact as fp32 ({proven}), but {speed.text()} < {MIN_SPEEDUP:.2f}x; "
                       "--precision int8 still runs it")
    return True, f"{proven}; {speed.text()}"


def quantize_checked(graph: bytes, mode: str, calib: np.ndarray, check: LabelledInputs,
                     rule: DecisionRule | None = None, speed: str = "record"
                     ) -> tuple[bytes, QuantCheck]:
    """Quantise ``graph`` (calibrating on ``calib``), then judge it on ``check`` (with the
    bundle's default ``rule``, its decisions too). ``speed``: ``"require"`` (int8 must also
    be ``MIN_SPEEDUP`` faster here: ``--quantize auto``), ``"record"`` (measured and kept,
    not part of the verdict: an explicit ``--quantize static``) or ``"skip"``; it is timed
    only once the graph is proven exact enough.

    Example:
        >>> q, c = quantize_checked(fp32, "static", x_train[:64], held_out)  # doctest: +SKIP
        >>> c.accepted, c.reason  # doctest: +SKIP
        (True, 'agreement 99.6% >= 99%, accuracy 91.2% -> 91.0% (-0.20 points) on 500 ...')
    """
    q = _quantize(graph, mode, calib)
    names = ("logits", "features") if rule is not None and rule.needs_features else ("logits",)
    out32, out8 = run_outputs(graph, check.x, names), run_outputs(q, check.x, names)  # one pass
    z32, z8 = out32[0], out8[0]
    p32, p8 = softmax(z32), softmax(z8)
    top32, top8 = p32.argmax(1), p8.argmax(1)
    acc32 = acc8 = None
    if check.labels is not None:
        acc32 = float((top32 == check.labels).mean())
        acc8 = float((top8 == check.labels).mean())
    agreement = float((top32 == top8).mean())
    decisions = None if rule is None else float(
        (rule.outcomes(*out32) == rule.outcomes(*out8)).mean())
    if speed not in ("require", "record", "skip"):
        raise ValueError(f"speed must be require, record or skip, got {speed!r}")
    accepted, reason = judge(agreement, acc32, acc8, len(check.x), decisions)
    timed = None
    if accepted and speed != "skip":
        timed = measure_speed(graph, q, check.x)
        accepted, reason = judge(agreement, acc32, acc8, len(check.x), decisions, timed,
                                 need_speed=speed == "require")
    return q, QuantCheck(mode, len(calib), len(check.x), agreement,
                         float(np.abs(p32 - p8).max()), acc32, acc8, accepted, reason,
                         disagreement_upper(int((top32 != top8).sum()), len(check.x)),
                         decisions, STATIC_RECIPE if mode == "static" else "dynamic, MatMul/Gemm",
                         timed)


def measure_speed(fp32: bytes, int8: bytes, x: np.ndarray, threads: int | None = None,
                  rounds: int = SPEED_ROUNDS, min_s: float = SPEED_MIN_S) -> SpeedCheck:
    """Time both graphs on ``x`` as the default ONNX backend runs them (each graph's own
    session layout, this machine's usable cores), in ``rounds`` interleaved rounds (the order
    alternates), after one warm-up pass each: the median within-round ratio of fp32's time
    over int8's. Every measurement repeats the pass until it lasts ``min_s`` at least (the
    same repeats for both graphs). At most two of the larger batch of images are used.

    Example:
        >>> s = measure_speed(fp32_graph, int8_graph, x_val)  # doctest: +SKIP
        >>> s.ratio > 0  # doctest: +SKIP
        True
    """
    from imgtriage.predict.onnx_backend import SessionPool, session_layout
    from imgtriage.predict.ort_session import usable_cores

    threads = int(threads or usable_cores())
    layouts = [session_layout(len(g), threads) for g in (fp32, int8)]
    x = np.ascontiguousarray(x[:2 * max(lay.batch_size for lay in layouts)], dtype=np.float32)
    pools = [SessionPool(g, lay) for g, lay in zip((fp32, int8), layouts, strict=True)]
    try:
        warm = [_timed_passes(p, x, lay.batch_size, 1)
                for p, lay in zip(pools, layouts, strict=True)]
        reps = max(1, int(np.ceil(min_s / max(min(warm), 1e-6))))
        ratios = []
        for r in range(rounds):
            t = [0.0, 0.0]
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                t[k] = _timed_passes(pools[k], x, layouts[k].batch_size, reps)
            ratios.append(t[0] / max(t[1], 1e-9))
    finally:
        for p in pools:
            p.close()
    shown = " / ".join(f"{lay.sessions} session(s) x {lay.threads_each} thread(s), batch "
                       f"{lay.batch_size}" for lay in layouts)
    return SpeedCheck(float(np.median(ratios)), float(min(ratios)), float(max(ratios)),
                      rounds, len(x), threads, f"fp32 / int8: {shown}")


def _timed_passes(pool: Any, x: np.ndarray, batch: int, reps: int) -> float:
    """Seconds for ``reps`` passes over ``x`` in batches of ``batch`` (the first output asked
    for; ONNX Runtime runs the whole graph whatever is asked)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(0, len(x), batch):
            pool.run(x[i:i + batch], pool.output_names[:1])
    return time.perf_counter() - t0


def disagreement_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen ``k`` times in ``n`` trials.

    Example:
        >>> round(disagreement_upper(0, 30), 3)  # no disagreement in 30 images
        0.095
        >>> round(disagreement_upper(5, 1000), 4)
        0.0105
    """
    if n <= 0 or k >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


class _Reader:
    """ONNX Runtime calibration reader over preprocessed images, 8 per batch."""

    def __init__(self, x: np.ndarray, name: str = "input", batch: int = 8) -> None:
        self._batches = iter([{name: np.ascontiguousarray(x[i:i + batch])}
                              for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(graph: bytes, mode: str, calib: np.ndarray,
              keep_fp32: Sequence[str] = FP32_PARTS) -> bytes:
    """int8 copy of ``graph``: static QDQ per-channel (calibrated on ``calib``, the recipe of
    :data:`STATIC_RECIPE`) or dynamic. ``keep_fp32``: which of :data:`FP32_PARTS` stay fp32
    (``()`` quantises every layer and output, the former recipe, kept for comparisons)."""
    q = require("onnxruntime.quantization", "onnx")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="imgtriage-quant-") as tmp:
        src, prep, dst = (Path(tmp) / n for n in ("fp32.onnx", "prep.onnx", "int8.onnx"))
        src.write_bytes(graph)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(prep))
            if mode == "static":
                parts = _fp32_parts(_name_nodes(prep))
                keep = [n for part in keep_fp32 if part != "outputs" for n in parts[part]]
                # U8 activations x S8 per-channel weights; reduce_range keeps AVX2 (no VNNI)
                # from saturating its 16-bit intermediate sums.
                q.quantize_static(str(prep), str(dst), _Reader(calib),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True,
                                  reduce_range=True, activation_type=q.QuantType.QUInt8,
                                  weight_type=q.QuantType.QInt8, nodes_to_exclude=keep,
                                  calibrate_method=q.CalibrationMethod.MinMax)
                q8 = dst.read_bytes()
                return float_outputs(q8) if "outputs" in keep_fp32 else q8
            q.quantize_dynamic(str(prep), str(dst), per_channel=True, reduce_range=True,
                               weight_type=q.QuantType.QInt8)
        return dst.read_bytes()


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CHAIN_OPS = ("Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid", "Mul", "MaxPool",
             "AveragePool", "BatchNormalization")


def _name_nodes(path: Path) -> Any:
    """Give every unnamed node of the graph at ``path`` a unique name (the quantiser excludes
    nodes by name), rewrite the file in place and return the loaded model."""
    import onnx

    m = onnx.load(str(path))
    used = {n.name for n in m.graph.node if n.name}
    for i, n in enumerate(m.graph.node):
        if not n.name:
            n.name = next(f"imgtriage_node_{i}_{k}" for k in range(len(used) + 1)
                          if f"imgtriage_node_{i}_{k}" not in used)
            used.add(n.name)
    onnx.save(m, str(path))
    return m


def _fp32_parts(m: Any) -> dict[str, list[str]]:
    """Names of the nodes of the (named) model ``m`` that may stay fp32 in the int8 graph:
    ``stem``, the first weighted layers (those the image input reaches without passing another
    weighted layer: a CNN's stem convolution) with the activation and pooling after them, and
    ``classifier``, the last (those the logits come from the same way), and ``features``,
    every node the ``logits`` output does not depend on (the OOD branch: stage statistics,
    their compression, the in-graph score)."""
    readers: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name for t in m.graph.initializer}
    inputs = [i.name for i in m.graph.input if i.name not in inits]
    logits = [o.name for o in m.graph.output if o.name == "logits"] or [m.graph.output[0].name]
    first = _weighted_frontier(inputs, lambda t: readers.get(t, []), lambda n: n.output)
    last = _weighted_frontier(logits, lambda t: [producer[t]] if t in producer else [],
                              lambda n: [i for i in n.input if i not in inits])
    by_name = {n.name: n for n in m.graph.node}
    stem = [name for f in first for name in _chain(by_name[f], readers)]
    return {"stem": list(dict.fromkeys(stem)), "classifier": last,
            "features": _not_feeding(m.graph.node, logits, producer)}


def _not_feeding(nodes: Any, outputs: list[str], producer: dict[str, Any]) -> list[str]:
    """Names of the nodes none of ``outputs`` depends on."""
    needed: set[str] = set()
    todo = list(outputs)
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n.name not in needed:
            needed.add(n.name)
            todo.extend(n.input)
    return [n.name for n in nodes if n.name not in needed]


def _chain(node: Any, readers: dict[str, list[Any]]) -> list[str]:
    """``node`` and the activation/pooling operators that follow it one after the other (each
    the only reader of the one before: Conv -> Relu -> MaxPool): kept fp32 together, so
    ONNX Runtime runs the stem as one fp32 block and quantises once, before the next layer
    (an fp32 pool between a Quantize and Dequantize pair ran ~15x slower than in int8)."""
    names = [node.name]
    while len(node.output) == 1 and len(nxt := readers.get(node.output[0], [])) == 1 and (
            nxt[0].op_type in CHAIN_OPS):
        node = nxt[0]
        names.append(node.name)
    return names


def _weighted_frontier(start: list[str], step: Any, onward: Any) -> list[str]:
    """Names of the weighted nodes reached from the tensors ``start`` (``step``: tensor ->
    nodes, ``onward``: node -> next tensors) without passing through another one."""
    frontier, seen, found = list(start), set(start), []
    while frontier:
        for n in step(frontier.pop()):
            if n.op_type in WEIGHTED_OPS:
                found.append(n.name)
                continue
            for t in onward(n):
                if t not in seen:
                    seen.add(t)
                    frontier.append(t)
    return list(dict.fromkeys(found))


def float_outputs(graph: bytes) -> bytes:
    """``graph`` with each output taken straight from the operator that computes it: the
    quantiser ends a graph output with a QuantizeLinear/DequantizeLinear pair, which rounds
    the logits (and features) to 256 levels of their calibration range and so flips near
    ties; the pair becomes an Identity of its float input.

    Example:
        >>> q = float_outputs(quantised_graph)  # doctest: +SKIP
    """
    import onnx
    from onnx import helper

    m = onnx.load_from_string(graph)
    outputs = {o.name for o in m.graph.output}
    producer = {o: n for n in m.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in m.graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    nodes, dropped = list(m.graph.node), set()
    for i, n in enumerate(nodes):
        src = producer.get(n.input[0]) if n.input else None
        if (n.op_type != "DequantizeLinear" or n.output[0] not in outputs or src is None
                or src.op_type != "QuantizeLinear"):
            continue
        nodes[i] = helper.make_node("Identity", [src.input[0]], [n.output[0]],
                                    name=f"{n.name}_float")
        readers[src.output[0]] -= 1
        if readers[src.output[0]] == 0 and src.output[0] not in outputs:
            dropped.add(src.name or id(src))
    if not any(n.op_type == "Identity" and n.name.endswith("_float") for n in nodes):
        return graph
    kept = [n for n in nodes if (n.name or id(n)) not in dropped]
    del m.graph.node[:]
    m.graph.node.extend(kept)
    return m.SerializeToString()
