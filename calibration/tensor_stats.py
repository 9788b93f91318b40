"""Finiteness and largest magnitude of every intermediate tensor of a graph, in flat memory.

Used to prove an fp16 conversion clean on real inputs (and to find which fp32 tensors leave
fp16's range), and as the `max` calibration of the int8 Q/DQ graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .feeds import Feed, RowFeedReader
from .graph_io import elem_types, load_typed

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
FP16_MAX = float(np.finfo(np.float16).max)

# Largest finite value of each float type a tensor can be declared with.
FLOAT_LIMITS = {
    TensorProto.FLOAT: float(np.finfo(np.float32).max),
    TensorProto.FLOAT16: FP16_MAX,
    TensorProto.BFLOAT16: 3.3895313892515355e38,
}


@dataclass(frozen=True)
class TensorStats:
    """One tensor over all feeds: whether it stayed finite, its largest |value| (inf when it
    was not), and the largest finite value of the type the graph declares for it."""

    finite: bool
    max_abs: float
    limit: float

    @property
    def overflows(self) -> bool:
        return not self.finite or self.max_abs > self.limit


def _instrument(model: onnx.ModelProto) -> dict[str, int]:
    """Give every float graph input and intermediate tensor two scalar outputs: the sum and
    the max of |x|. The sum is NaN or inf exactly when the tensor holds a NaN or inf.

    The nodes go right after the producer, so that a priority-based execution order reduces
    and frees each tensor at once (docs/benchmarks.md has the measured peaks). Returns the
    instrumented tensors with their declared element types.
    """
    graph = model.graph
    types = elem_types(model)
    weights = {t.name for t in graph.initializer}
    names: dict[str, int] = {}

    def reductions(name: str) -> list[onnx.NodeProto]:
        if not name or name in weights or types.get(name) not in FLOAT_TYPES:
            return []
        stem = f"_stats_{len(names)}"
        names[name] = types[name]
        value, cast = name, []
        if types[name] != TensorProto.FLOAT:
            value = stem + "_f32"
            cast = [helper.make_node("Cast", [name], [value], to=TensorProto.FLOAT)]
        for out in ("_sum", "_max"):
            graph.output.append(helper.make_tensor_value_info(stem + out, TensorProto.FLOAT, []))
        return [
            *cast,
            helper.make_node("Abs", [value], [stem + "_abs"]),
            helper.make_node("ReduceSum", [stem + "_abs"], [stem + "_sum"], keepdims=0),
            helper.make_node("ReduceMax", [stem + "_abs"], [stem + "_max"], keepdims=0),
        ]

    nodes = [n for value in graph.input for n in reductions(value.name)]
    for node in graph.node:
        nodes += [node, *(n for name in node.output for n in reductions(name))]
    del graph.node[:]
    graph.node.extend(nodes)
    return names


def tensor_stats(graph: Path, feeds: Sequence[Feed]) -> dict[str, TensorStats]:
    """Finiteness and largest magnitude of every float tensor but the weights over `feeds`.

    The graph is instrumented on a copy in memory (the file is untouched): each tensor gets
    two scalar reductions, so memory stays near that of a normal run instead of holding every
    intermediate (the full-size vision tower's attention maps alone would take > 10 GB).
    Graph optimisations are off so that every tensor the graph names is computed as written.
    """
    graph = Path(graph)
    model = load_typed(graph, with_data=False)
    names = _instrument(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # The default order runs the reductions last and keeps every tensor alive until then.
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # External weights are read from beside the original graph, not copied.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(graph.parent.resolve())
    )
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    del model
    outputs = [o.name for o in session.get_outputs()]
    finite = np.ones(len(names), dtype=bool)
    maxima = np.zeros(len(names))
    # One row at a time: rows never interact in these towers, so the statistics are those
    # of the batches (padding aside) at a batch-size fraction of the memory.
    for feed in RowFeedReader(feeds).rows:
        values = dict(zip(outputs, session.run(None, feed), strict=True))
        for i in range(len(names)):
            finite[i] &= bool(np.isfinite(values[f"_stats_{i}_sum"]))
            maxima[i] = max(maxima[i], float(values[f"_stats_{i}_max"]))
    return {
        name: TensorStats(bool(finite[i]), float(maxima[i]), FLOAT_LIMITS[dtype])
        for i, (name, dtype) in enumerate(names.items())
    }
