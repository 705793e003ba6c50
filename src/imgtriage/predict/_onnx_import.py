"""Make a foreign ONNX classifier take what ``to_input`` gives and answer logits.

A bundle's graph takes the normalised ``(N, C, h, w)`` float32 batch of
:func:`imgtriage.data.preprocess.to_input` and returns logits (``predict/export.py``). A graph
made by Keras/tf2onnx usually takes ``(N, h, w, C)`` and ends in a softmax. Rather than
teaching every backend about layouts and output kinds, the import wraps the graph once:

- ``nhwc`` input: a ``Transpose`` from the new NCHW input to the old input;
- ``probabilities`` output: ``Log(Max(p, 1e-30))`` gives logits whose softmax is ``p``
  (to float precision), so temperature scaling and every decision rule apply unchanged.

The new graph is checked against the original on the same inputs before it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtriage.errors import BundleError, ConfigError, require

LAYOUTS = ("auto", "nchw", "nhwc")
OUTPUT_KINDS = ("auto", "logits", "probabilities")
INPUT_NAME, OUTPUT_NAME = "input", "logits"  # what every bundle graph takes and answers
FOREIGN_INPUT, FOREIGN_OUTPUT = "foreign_input", "foreign_output"
_FLOAT = 1  # onnx.TensorProto.FLOAT
_CHANNEL_COUNTS = (1, 3, 4)
TINY = 1e-30


@dataclass(frozen=True)
class GraphInfo:
    """What the import learned about a foreign graph."""

    layout: str
    outputs: str
    in_chans: int
    size: tuple[int, int] | None  # (h, w) when the graph fixes it
    num_outputs: int | None  # classes when the graph fixes it
    original_input: str
    original_output: str
    opset: int

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "outputs": self.outputs, "in_chans": self.in_chans,
                "size": list(self.size) if self.size else None,
                "original_input": self.original_input,
                "original_output": self.original_output, "opset": self.opset}


def _dims(value_info: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def _layout(dims: list[int | None], given: str) -> str:
    if given != "auto":
        return given
    first, last = dims[1] in _CHANNEL_COUNTS, dims[3] in _CHANNEL_COUNTS
    if first != last:
        return "nchw" if first else "nhwc"
    raise ConfigError(f"cannot tell the input layout of shape {dims} (channels first or "
                      "last?); say --layout nchw or --layout nhwc")


def _output_kind(graph: Any, output: str, given: str) -> str:
    if given != "auto":
        return given
    producer = next((n for n in graph.node if output in n.output), None)
    return "probabilities" if producer is not None and producer.op_type == "Softmax" \
        else "logits"


def _single(items: list[Any], what: str) -> Any:
    if len(items) != 1:
        raise ConfigError(f"the ONNX graph has {len(items)} {what}s "
                          f"({', '.join(i.name for i in items)}); imgtriage imports a "
                          f"classifier with one image input and one class-score output")
    return items[0]


def inspect_graph(graph: bytes, layout: str = "auto", outputs: str = "auto") -> GraphInfo:
    """Read the input/output of a foreign classifier graph (refusing what cannot be wrapped)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r} "
                          "(--layout)")
    if outputs not in OUTPUT_KINDS:
        raise ConfigError(f"outputs must be one of {', '.join(OUTPUT_KINDS)}, got {outputs!r}"
                          " (--outputs)")
    onnx = require("onnx", "onnx")
    try:
        model = onnx.load_from_string(graph)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise BundleError(f"not an ONNX model ({type(exc).__name__}: {exc}); pass a .onnx "
                          "file (Keras: convert with tf2onnx, see docs/import.md)") from exc
    g = model.graph
    weights = {i.name for i in g.initializer}
    inp = _single([i for i in g.input if i.name not in weights], "input")
    out = _single(list(g.output), "output")
    if inp.type.tensor_type.elem_type != _FLOAT:
        raise ConfigError(f"the graph's input {inp.name!r} is not float32; imgtriage feeds "
                          "float32 images (re-export the model with a float input)")
    dims = _dims(inp)
    if len(dims) != 4:
        raise ConfigError(f"the graph's input {inp.name!r} has shape {dims}; an image "
                          "classifier takes (N, C, h, w) or (N, h, w, C)")
    lay = _layout(dims, layout)
    c, h, w = (dims[1], dims[2], dims[3]) if lay == "nchw" else (dims[3], dims[1], dims[2])
    if c is None:
        raise ConfigError(f"the graph's input {inp.name!r} leaves the channel count open; "
                          "re-export it with a fixed number of channels")
    out_dims = _dims(out)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphInfo(lay, _output_kind(g, out.name, outputs), int(c),
                     (int(h), int(w)) if h and w else None,
                     out_dims[-1] if out_dims and out_dims[-1] else None, inp.name, out.name,
                     int(opset))


def _rename(g: Any, old: str, new: str) -> None:
    """Rename tensor ``old`` everywhere in graph ``g`` (node inputs/outputs, graph I/O)."""
    for node in g.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.name == old:
            vi.name = new


def wrap_graph(graph: bytes, info: GraphInfo) -> bytes:
    """The graph with an NCHW float input ``input`` and a logits output ``logits`` (the names
    every bundle graph has), both with a free batch dimension. The original tensors are
    renamed ``foreign_input``/``foreign_output`` first, so their names never collide."""
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(graph)
    g = model.graph
    _rename(g, info.original_input, FOREIGN_INPUT)
    _rename(g, info.original_output, FOREIGN_OUTPUT)
    old_in = next(i for i in g.input if i.name == FOREIGN_INPUT)
    old_out = next(o for o in g.output if o.name == FOREIGN_OUTPUT)
    h, w = info.size if info.size else ("height", "width")
    new_in = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                           ["batch", info.in_chans, h, w])
    if info.layout == "nhwc":
        first = helper.make_node("Transpose", [INPUT_NAME], [FOREIGN_INPUT],
                                 perm=[0, 2, 3, 1], name="imgtriage_to_nhwc")
    else:
        first = helper.make_node("Identity", [INPUT_NAME], [FOREIGN_INPUT],
                                 name="imgtriage_input_identity")
    last: list[Any] = []
    if info.outputs == "probabilities":
        g.initializer.append(numpy_helper.from_array(np.array(TINY, np.float32),
                                                     "imgtriage_tiny"))
        last = [helper.make_node("Max", [FOREIGN_OUTPUT, "imgtriage_tiny"],
                                 ["imgtriage_floored"], name="imgtriage_floor"),
                helper.make_node("Log", ["imgtriage_floored"], [OUTPUT_NAME],
                                 name="imgtriage_log")]
    else:
        last = [helper.make_node("Identity", [FOREIGN_OUTPUT], [OUTPUT_NAME],
                                 name="imgtriage_output_identity")]
    g.input.remove(old_in)
    g.input.insert(0, new_in)
    g.output.remove(old_out)
    g.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                                  ["batch", info.num_outputs or "classes"]))
    g.node.insert(0, first)
    g.node.extend(last)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"the wrapped ONNX graph does not check ({exc}); re-export the "
                          "model with a recent opset") from exc
    return model.SerializeToString()


def run_foreign(graph: bytes, x_nchw: np.ndarray, info: GraphInfo) -> np.ndarray:
    """The original graph's output on ``x_nchw`` (transposed for an NHWC graph)."""
    from imgtriage.predict.ort_session import run_graph

    x = x_nchw.transpose(0, 2, 3, 1) if info.layout == "nhwc" else x_nchw
    return run_graph(graph, np.ascontiguousarray(x, dtype=np.float32),
                     output=info.original_output)


def check_wrapped(original: bytes, wrapped: bytes, info: GraphInfo, num_classes: int,
                  shape: tuple[int, int, int]) -> float:
    """Run both graphs on the same random batch of 2 (which also proves the batch dimension
    is free) and return max |Δprobability|; refuse a class-count mismatch."""
    from imgtriage.evaluate.decision import softmax
    from imgtriage.predict.ort_session import run_graph

    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    try:
        got = run_graph(wrapped, x)
        ref = run_foreign(original, x, info)
    except Exception as exc:  # ORT's own exception types
        raise BundleError(f"ONNX Runtime cannot run the model on a batch of 2 images of shape "
                          f"{shape}: {str(exc).splitlines()[0]}. Export it with a free batch "
                          "dimension (tf2onnx does by default) and check --size") from exc
    if got.ndim != 2:
        raise ConfigError(f"the model answers shape {list(got.shape)} per batch, not "
                          "(N, classes); import a classifier")
    if got.shape[1] != num_classes:
        raise ConfigError(f"the model has {got.shape[1]} outputs but {num_classes} class names "
                          "were given; pass one name per output, in output order (--classes)")
    ref_p = ref if info.outputs == "probabilities" else softmax(ref)
    return float(np.abs(softmax(got) - ref_p).max())
