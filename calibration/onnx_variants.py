"""Mixed-precision variants of a quantised ONNX graph, derived instead of converted again.

onnxruntime's quantisers (dynamic int8 for the CPU, static Q/DQ for GPUs) take a minute or
more per full-size tower, and the static one calibrates again every time; a search that asks
for 30 variants would convert 30 times (25 minutes for the vision ranking alone). Both keep
the name of every tensor of the float graph, so a variant with some nodes float is the
quantised graph with those nodes' replacements swapped back for the float nodes: remove the
quantised node of that name and whatever produces the node's outputs, insert the float node,
drop what nothing reads any more. That takes seconds.

For dynamic int8 the result is the graph a conversion with those nodes excluded writes (tested
bit for bit). For Q/DQ the quantised nodes are the same, and their activation ranges are the
ones calibrated once on the whole-int8 graph; a float node also reads its float input even
where onnxruntime would have fed it the Q/DQ copy of an input it shares with a quantised node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.transformers.onnx_model import OnnxModel

from .graph_io import save_model


@dataclass(frozen=True)
class Graph:
    """A graph's nodes without its initializers (a cheap copy), and the initializers by name."""

    skeleton: onnx.ModelProto
    weights: dict[str, onnx.TensorProto]

    @classmethod
    def load(cls, path: Path) -> Graph:
        model = onnx.load(str(path))
        weights = {tensor.name: tensor for tensor in model.graph.initializer}
        model.graph.ClearField("initializer")  # the tensors live on, referenced by `weights`
        return cls(model, weights)


def with_float_nodes(
    quantized: Graph, original: Graph, float_nodes: Sequence[str]
) -> onnx.ModelProto:
    """`quantized` with the nodes named `float_nodes` back as they are in `original`, carrying
    only the weights its nodes read (the float nodes' from `original`)."""
    originals = {node.name: node for node in original.skeleton.graph.node}
    unknown = [name for name in float_nodes if name not in originals]
    if unknown:
        raise ValueError(f"{len(unknown)} node(s) not in the float graph, e.g. {unknown[:3]}")
    wanted = {name: originals[name] for name in float_nodes}
    replaced_by = {out: name for name, node in wanted.items() for out in node.output}
    # Each float node goes where the last quantised node it replaces was: its inputs are
    # produced earlier (the quantised chain read them), its readers come later.
    position: dict[str, int] = {}
    kept: list[tuple[int, onnx.NodeProto]] = []
    for index, node in enumerate(quantized.skeleton.graph.node):
        owners = {replaced_by[out] for out in node.output if out in replaced_by}
        if node.name in wanted:
            owners.add(node.name)
        for owner in owners:
            position[owner] = index
        if not owners:
            kept.append((index, node))
    missing = [name for name in wanted if name not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} node(s) have no counterpart in the quantised graph: {missing[:3]}"
        )
    ordered = sorted(
        [*kept, *((position[name], node) for name, node in wanted.items())],
        key=lambda item: item[0],
    )
    model = onnx.ModelProto()
    model.CopyFrom(quantized.skeleton)
    graph = model.graph
    graph.ClearField("node")
    graph.node.extend(node for _, node in ordered)
    # Drops the quantisers and scale products that only fed the removed nodes.
    OnnxModel(model).prune_graph(allow_remove_graph_inputs=False)
    produced = {name for node in graph.node for name in node.output}
    values = [value for value in graph.value_info if value.name in produced]
    graph.ClearField("value_info")
    graph.value_info.extend(values)
    float_reads = {name for node in wanted.values() for name in node.input}
    available = produced | {value.name for value in graph.input} | {""}
    for name in sorted({name for node in graph.node for name in node.input} - available):
        sources = (original, quantized) if name in float_reads else (quantized, original)
        tensor = next((g.weights[name] for g in sources if name in g.weights), None)
        if tensor is None:
            raise ValueError(f"the variant reads {name!r}, which no node or weight provides")
        graph.initializer.append(tensor)
    return model


def quantize_once(
    src: Path, quantize: Callable[[Path], Path]
) -> Callable[[Sequence[str], Path], Path]:
    """A search converter: `quantize(dst)` writes the whole-tower graph on the first call;
    every variant after it is derived from that graph and the float one `src` (both held in
    memory until the converter is dropped)."""
    quantized: list[Graph] = []
    original = functools.cache(lambda: Graph.load(src))

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        if not quantized:
            whole = quantize(dst)
            quantized.append(Graph.load(whole))
            if not keep_float:
                return whole
        return save_model(with_float_nodes(quantized[0], original(), keep_float), dst)

    return convert
