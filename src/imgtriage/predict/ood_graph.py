"""The OOD score inside the ONNX graph: one session run gives the logits and the score.

Scoring the ``features`` output in NumPy after each run cost ~1.2 ms per batch of 64 on one
thread, while ONNX Runtime's sessions ran the model on both cores: a 28 px model whose batch
takes ~7 ms lost 16% of its throughput (``docs/benchmarks.md``). Appended to the graph, the
score is a few more operators run by ONNX Runtime's own threads, split with the batch like
the model itself.

The head reads the graph's ``features`` output and writes ``ood_score`` (N,) float32, the
same number :meth:`imgtriage.evaluate.ood.KnnOOD.score` gives (float32 here, float64 there;
checked at export to ``SCORE_TOLERANCE``):

* k-NN: the features L2-normalised, ``MatMul`` with the normalised bank (a constant),
  ``TopK`` for the k-th largest similarity, ``sqrt(max(0, 2 - 2 s))``.
* relative Mahalanobis (``knn+rmd``): each precision matrix factored as ``P = W W^T``
  (eigendecomposition, float64), so a quadratic form is a squared norm of ``(f - mu0) W``;
  the class term by expansion on features centred on the training mean first (no
  cancellation: error ~2e-5 on scores of order 1, 10x smaller than uncentred), its minimum
  over classes by ``TopK(largest=0)``; memory stays (N, C), never (N, C, D).
* stage statistics (``knn+rmd+stages``): each stage's columns sliced from ``features``, its
  Mahalanobis distance as a squared norm of ``(s - mu) W`` like the above; the penultimate
  part (the first columns) feeds the two scores above.
* each standardised by the stored median and spread, and the largest kept.

The head goes onto the graphs *after* export and int8 quantisation, so its constants are never
quantised and an int8 graph's score comes from that graph's own features. Only a few opset-11
operators are used, no ``axes`` attributes or inputs (whose form changed in opset 18), so it
fits any opset >= 11. ``onnx`` is needed to build the head (training, export), not to run it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from imgtriage.bundle.graph import OOD_SCORE_OUTPUT, num_features, ood_score_record
from imgtriage.bundle.record import Manifest
from imgtriage.bundle.store import sha256_bytes
from imgtriage.errors import BundleError, require
from imgtriage.evaluate.ood import KnnOOD, KnnRmdOOD, KnnRmdStagesOOD

FEATURES_OUTPUT = "features"
PREFIX = "imgtriage_ood/"
MIN_OPSET = 11
# max |in-graph score - NumPy score| on the check images (relative beyond 1); the standardised
# scores and their thresholds are of order 1, and measured differences are 1e-5 - 3e-5
SCORE_TOLERANCE = 1e-3


def _factor(prec: np.ndarray) -> np.ndarray:
    """``W`` with ``W @ W.T == prec`` for a symmetric positive semi-definite ``prec``."""
    p = np.asarray(prec, dtype=np.float64)
    w, v = np.linalg.eigh((p + p.T) / 2.0)
    return v * np.sqrt(np.clip(w, 0.0, None))


class _Head:
    """Nodes and constants of the head, every name under :data:`PREFIX`."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.consts: dict[str, np.ndarray] = {}

    def const(self, name: str, value: Any) -> str:
        arr = np.asarray(value)
        self.consts[PREFIX + name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
        return PREFIX + name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        helper = require("onnx", "onnx").helper
        out = PREFIX + name
        self.nodes.append(helper.make_node(op_type, inputs, [out, *(
            [out + "_idx"] if op_type == "TopK" else [])], name=out, **attrs))
        return out

    def smallest(self, x: str, k: int, name: str) -> str:
        """The k-th smallest value of each row of (N, M) ``x``, as (N, 1)."""
        top = self.op("TopK", [x, self.const(name + "_k", np.array([k], np.int64))],
                      name + "_top", axis=-1, largest=0, sorted=1)
        return self.op("Gather", [top, self.const(name + "_i", np.array([k - 1], np.int64))],
                       name, axis=1)


def _knn(h: _Head, f: str, scorer: KnnOOD, med: float, spread: float) -> str:
    """(k-th smallest distance to the bank - med) / spread, as (N, 1). The bank is stored as
    -2 b / s^2, so one MatMul gives the squared distances less 2 / s^2 (added after the k-th
    is picked, to N values instead of N x M), and sqrt(d^2 / s^2) = d / s."""
    k = min(int(scorer.k), len(scorer.bank_))
    a = 1.0 / spread ** 2
    sims = h.op("MatMul", [f, h.const("bank_t", -2.0 * a * scorer.bank_.T)], "sims")
    d2 = h.op("Add", [h.smallest(sims, k, "kth"), h.const("two", np.float32(2.0 * a))], "d2")
    d = h.op("Sqrt", [h.op("Max", [d2, h.const("zero", np.float32(0.0))], "d2_pos")], "knn")
    return d if med == 0.0 else h.op("Sub", [d, h.const("knn_med", med / spread)], "knn_z")


def _rmd(h: _Head, f: str, scorer: KnnRmdOOD) -> str:
    """(min_c |(f - mu_c) W|^2 - |(f - mu0) W0|^2 - med) / spread as (N, 1), with P = W W^T
    (and W0) scaled by 1/sqrt(spread). On f centred on mu0, with p = fc W, p0 = fc W0:
    |p - mu_c W|^2 - |p0|^2 = -2 p.(mu_c W) + |mu_c W|^2 + |p|^2 - |p0|^2, every term for
    every class from one MatMul of [p, p0, p^2, p0^2] (N, 4D) with a (4D, C) constant."""
    med, spread = scorer.scale_["rmd"]
    w = np.concatenate([_factor(scorer.prec_), _factor(scorer.prec0_)], 1) / np.sqrt(spread)
    d = w.shape[0]
    mu0 = np.asarray(scorer.mean0_, dtype=np.float64)
    mu_w = (np.asarray(scorer.means_, dtype=np.float64) - mu0) @ w[:, :d]  # (C, D)
    n_classes = len(mu_w)
    m = np.zeros((4 * d, n_classes))
    m[:d] = -2.0 * mu_w.T
    m[2 * d:3 * d], m[3 * d:] = 1.0, -1.0
    p = h.op("MatMul", [h.op("Sub", [f, h.const("mean0", mu0)], "centred"), h.const("w", w)],
             "proj")
    both = h.op("Concat", [p, h.op("Mul", [p, p], "proj_sq")], "proj_both", axis=1)
    dist = h.op("Add", [h.op("MatMul", [both, h.const("m", m)], "class_terms"),
                        h.const("bias", (mu_w ** 2).sum(1) - med / spread)], "rmd_classes")
    return h.smallest(dist, 1, "rmd_z")


def _columns(h: _Head, features: str, start: int, stop: int, name: str) -> str:
    """``features[:, start:stop]``."""
    return h.op("Slice", [features, h.const(name + "_a", np.array([start], np.int64)),
                          h.const(name + "_b", np.array([stop], np.int64)),
                          h.const(name + "_ax", np.array([1], np.int64))], name)


def _stages(h: _Head, features: str, scorer: KnnRmdStagesOOD) -> list[str]:
    """Each stage's (|(s - mu) W|^2 - med) / spread as (N, 1), with P = W W^T scaled by
    1/sqrt(spread), read from its columns of ``features``."""
    out, start = [], scorer.dim_
    for j, width in enumerate(scorer.stage_widths):
        med, spread = scorer.stage_scale_[j]
        part = _columns(h, features, start, start + width, f"stage{j}")
        start += width
        c = h.op("Sub", [part, h.const(f"stage{j}_mean", scorer.stage_means_[j])],
                 f"stage{j}_centred")
        proj = h.op("MatMul", [c, h.const(f"stage{j}_w", _factor(scorer.stage_precs_[j])
                                          / np.sqrt(spread))], f"stage{j}_proj")
        d = h.op("MatMul", [h.op("Mul", [proj, proj], f"stage{j}_sq"),
                            h.const(f"stage{j}_ones", np.ones((width, 1)))],
                 f"stage{j}_d")
        out.append(h.op("Sub", [d, h.const(f"stage{j}_med", np.float32(med / spread))],
                        f"stage{j}_z"))
    return out


def _head(scorer: KnnOOD, features: str) -> tuple[_Head, str]:
    """The head's nodes from ``features`` to the score (N, 1)."""
    h = _Head()
    stage_z: list[str] = []
    if isinstance(scorer, KnnRmdStagesOOD):
        stage_z = _stages(h, features, scorer)
        features = _columns(h, features, 0, scorer.dim_, "penultimate")
    sq = h.op("Mul", [features, features], "feat_sq")
    norm = h.op("Sqrt", [h.op("MatMul", [sq, h.const("ones", np.ones((
        scorer.bank_.shape[1], 1)))], "norm_sq")], "norm")
    f = h.op("Div", [features, h.op("Max", [norm, h.const("eps", np.float32(1e-12))],
                                    "norm_pos")], "unit")
    if isinstance(scorer, KnnRmdOOD):
        (med, spread) = scorer.scale_["knn"]
        return h, h.op("Max", [_knn(h, f, scorer, med, spread), _rmd(h, f, scorer), *stage_z],
                       "fused")
    return h, _knn(h, f, scorer, 0.0, 1.0)


def add_ood_score(graph: bytes, scorer: KnnOOD) -> bytes:
    """``graph`` with an ``ood_score`` (N,) output computed from its ``features`` output.

    Example:
        >>> scored = add_ood_score(bundle.verified_bytes("model.onnx"), scorer)  # doctest: +SKIP
        >>> session.run(["logits", "ood_score"], {"input": x})  # doctest: +SKIP
    """
    onnx = require("onnx", "onnx")
    if not hasattr(scorer, "bank_"):
        raise BundleError("the OOD scorer is not fitted; nothing to put in the graph")
    proto = onnx.load_from_string(graph)
    g = proto.graph
    outputs = [o.name for o in g.output]
    if FEATURES_OUTPUT not in outputs:
        raise BundleError(f"the graph has no {FEATURES_OUTPUT!r} output to score")
    if OOD_SCORE_OUTPUT in outputs:
        raise BundleError(f"the graph already has an {OOD_SCORE_OUTPUT!r} output")
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if opset < MIN_OPSET:
        raise BundleError(f"opset {opset} < {MIN_OPSET}: no in-graph OOD score")
    h, fused = _head(scorer, FEATURES_OUTPUT)
    h.nodes.append(onnx.helper.make_node("Reshape", [fused, h.const("flat", np.array(
        [-1], np.int64))], [OOD_SCORE_OUTPUT], name=PREFIX + "score"))
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {
        i.name for i in g.initializer}
    clash = sorted(taken & {*h.consts, *(o for n in h.nodes for o in n.output)})
    if clash:
        raise BundleError(f"the graph already uses the names {clash[:3]}")
    g.node.extend(h.nodes)
    g.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in h.consts.items())
    g.output.append(onnx.helper.make_tensor_value_info(OOD_SCORE_OUTPUT,
                                                       onnx.TensorProto.FLOAT, ["batch"]))
    return proto.SerializeToString()


def without_ood_score(graph: bytes) -> bytes:
    """``graph`` less the head :func:`add_ood_score` appended (every name under
    :data:`PREFIX`, and the ``ood_score`` output): the model exactly as exported. ONNX
    Runtime runs every node of a graph whatever outputs a run asks for, so a backend runs
    this for calls that do not need the score (TTA views, rules without an OOD part).
    """
    onnx = require("onnx", "onnx")
    proto = onnx.load_from_string(graph)
    g = proto.graph
    keep = [n for n in g.node if not n.name.startswith(PREFIX)]
    inits = [i for i in g.initializer if not i.name.startswith(PREFIX)]
    outs = [o for o in g.output if o.name != OOD_SCORE_OUTPUT]
    for field, items in ((g.node, keep), (g.initializer, inits), (g.output, outs)):
        del field[:]
        field.extend(items)
    return proto.SerializeToString()


def score_parity(graph: bytes, scorer: KnnOOD, x: np.ndarray,
                 features: np.ndarray | None = None) -> float:
    """max |in-graph score - the scorer's NumPy score of the same graph's features| on ``x``
    (and ``features`` for a fusion graph's second input), relative where the score is beyond
    1 (the stage scores of an input far from the training images reach 1e4: float32 keeps
    their first 6-7 digits)."""
    from imgtriage.predict.ort_session import run_graph

    feats = run_graph(graph, x, features=features, output=FEATURES_OUTPUT)
    got = run_graph(graph, x, features=features, output=OOD_SCORE_OUTPUT)
    want = scorer.score(feats)
    return float((np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))).max())


def attach_ood_score(manifest: Manifest, files: dict[str, bytes], x_check: np.ndarray | None,
                     say: Callable[[str], None] | None = None
                     ) -> tuple[Manifest, dict[str, bytes]]:
    """The bundle being written, with the OOD head on each of its graphs (fp32, int8) when its
    decision rule has an OOD scorer whose file is in ``files``; its ``onnx`` block records the
    head (``ood_score``) or why there is none (NumPy scoring of the features then, as for
    bundles written before in-graph scores). The graphs' hashes in the block are updated.

    Example:
        >>> manifest, files = attach_ood_score(manifest, {**graphs, **cal.files},
        ...                                    x_val[:16])  # doctest: +SKIP
    """
    info = dict(manifest.block("onnx") or {})
    rule = manifest.decision.get("ood")
    if not rule or not info.get("file") or FEATURES_OUTPUT not in (info.get("outputs") or []):
        return manifest, files
    ood_file = files.get(str(rule.get("file", "")))
    if ood_file is None:
        return manifest, files
    int8 = dict(info.get("int8") or {})
    names = [n for n in (info["file"], int8.get("file")) if n and n in files]
    if x_check is None or not len(x_check):  # random inputs, like the graph's own check
        pre = manifest.preprocess
        x_check = np.random.default_rng(0).standard_normal(
            (4, int(pre["in_chans"]), *(int(v) for v in pre["size"]))).astype(np.float32)
    out, record = scored_graphs(files, names, rule, ood_file, x_check,
                                num_features(manifest), say)
    info["ood_score"] = record
    if "skipped" not in record:
        info["outputs"] = [*info["outputs"], OOD_SCORE_OUTPUT]
        info["sha256"] = sha256_bytes(out[info["file"]])
        if int8.get("file") in names:
            info["int8"] = {**int8, "sha256": sha256_bytes(out[int8["file"]])}
    return manifest.with_changes(onnx=info), out


def scored_graphs(files: dict[str, bytes], names: list[str], rule: dict[str, Any],
                  ood_file: bytes, x_check: np.ndarray, n_features: int | None = None,
                  say: Callable[[str], None] | None = None
                  ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """``files`` with the OOD head appended to each graph in ``names``, and the ``onnx``
    block's ``ood_score`` record (or why there is none: the bundle then scores the features
    in NumPy, as bundles written before in-graph scores do).

    ``x_check``: model inputs to check each head against the NumPy scorer on; a fusion graph
    (``n_features`` columns in its second input) gets standard-normal rows there, like the
    graph's own parity check.
    """
    from safetensors.numpy import load

    from imgtriage.evaluate.ood import scorer_from_rule

    scorer = scorer_from_rule(rule, load(ood_file))
    x_check = np.ascontiguousarray(x_check, dtype=np.float32)
    f_check = None if n_features is None else np.random.default_rng(1).standard_normal(
        (len(x_check), n_features)).astype(np.float32)
    out, parity = dict(files), 0.0
    try:
        for name in names:
            scored = add_ood_score(files[name], scorer)
            err = score_parity(scored, scorer, x_check, f_check)
            if not err <= SCORE_TOLERANCE:
                raise BundleError(f"{name}: in-graph OOD score differs from NumPy's by "
                                  f"{err:.1e} (> {SCORE_TOLERANCE})")
            out[name], parity = scored, max(parity, err)
    except Exception as exc:  # any failure keeps the features output and NumPy scoring
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if say is not None:
            say(f"OOD score stays outside the graph: {reason}")
        return files, {"skipped": reason}
    added = max((len(out[n]) - len(files[n]) for n in names), default=0)
    record = {**ood_score_record(rule, sha256_bytes(ood_file)), "graphs": list(names),
              "parity_max_abs": parity, "parity_images": len(x_check), "added_bytes": added}
    return out, record
