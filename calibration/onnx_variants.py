"""Mixed-precision variants of a quantised ONNX graph, derived instead of converted again.

onnxruntime's quantisers (dynamic int8 for the CPU, static Q/DQ for GPUs) take a minute or
more per full-size tower, and the static one calibrates again every time; a search that asks
for 30 variants would convert 30 times (25 minutes for the vision ranking alone). Both keep
the name of every tensor of the float graph, so a variant with some nodes float is the
quantised graph with those nodes' replacements swapped back for the float nodes: remove the
quantised node of that name and whatever produces the node's outputs, insert the float node,
drop what nothing reads any more. That takes seconds, with the same result as converting
with those nodes excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
from onnxruntime.transformers.onnx_model import OnnxModel

from .graph_io import save_model


def with_float_nodes(
    quantized: onnx.ModelProto,
    original: onnx.ModelProto,
    float_nodes: Sequence[str],
    weights: dict[str, onnx.TensorProto],
) -> onnx.ModelProto:
    """`quantized` with the nodes named `float_nodes` back as they are in `original`.

    `quantized` and `original` are weightless skeletons (nodes only); `weights` maps every
    initializer name of both graphs to its tensor (the quantised graph's first). The result
    carries only the weights its nodes read.
    """
    originals = {node.name: node for node in original.graph.node}
    unknown = [name for name in float_nodes if name not in originals]
    if unknown:
        raise ValueError(f"{len(unknown)} node(s) not in the float graph, e.g. {unknown[:3]}")
    wanted = {name: originals[name] for name in float_nodes}
    replaced_by = {out: name for name, node in wanted.items() for out in node.output}
    # Each float node goes where the last quantised node it replaces was: its inputs are
    # produced earlier (the quantised chain read them), its readers come later.
    position: dict[str, int] = {}
    kept: list[tuple[int, onnx.NodeProto]] = []
    for index, node in enumerate(quantized.graph.node):
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
    model.CopyFrom(quantized)
    graph = model.graph
    graph.ClearField("node")
    graph.node.extend(node for _, node in ordered)
    # Drops the quantisers and scale products that only fed the removed nodes.
    OnnxModel(model).prune_graph(allow_remove_graph_inputs=False)
    read = {name for node in graph.node for name in node.input}
    produced = {name for node in graph.node for name in node.output}
    values = [value for value in graph.value_info if value.name in produced]
    graph.ClearField("value_info")
    graph.value_info.extend(values)
    graph.initializer.extend(weights[name] for name in sorted(read) if name in weights)
    return model


def _skeleton(path: Path) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A graph without its initializers, and the initializers by name."""
    model = onnx.load(str(path))
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    model.graph.ClearField("initializer")  # the tensors live on, referenced by `weights`
    return model, weights


def quantize_once(
    src: Path, quantize: Callable[[Path], Path]
) -> Callable[[Sequence[str], Path], Path]:
    """A search converter: `quantize(dst)` writes the whole-tower graph on the first call;
    every variant after it is derived from that graph and the float one `src`."""
    state: dict[str, tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]] = {}

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        if "quantized" not in state:
            whole = quantize(dst)
            state["quantized"] = _skeleton(whole)
            if not keep_float:
                return whole
        if "float" not in state:
            state["float"] = _skeleton(src)
        (quantized, quantized_weights), (original, float_weights) = (
            state["quantized"],
            state["float"],
        )
        weights = {**float_weights, **quantized_weights}
        return save_model(with_float_nodes(quantized, original, keep_float, weights), dst)

    return convert
