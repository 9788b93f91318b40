"""FP16 tower graphs for GPUs, and the FP16 input of strongly typed TensorRT builds.

TensorRT 11 (and TensorRT 10 with strong typing) takes each layer's precision from the graph's
tensor types, so the graph itself must say which parts stay fp32. The conversion is
onnxruntime's `convert_float_to_float16` with fp32 graph inputs and outputs; ops in
`keep_fp32_ops` and the pooling head after the last transformer block stay fp32 (see
`DEFAULT_FP32_OPS` for what was measured). Two clean-ups make the result fit for TensorRT:
the fp32 -> fp16 -> fp32 Cast pairs that the converter leaves between neighbouring fp32 nodes
are removed (they would round fp32 tensors through fp16), and the nodes are put back in
topological order (the converter appends its Casts at the end of the node list).

`tensor_stats` / `find_overflow` run a graph with the finiteness and the largest magnitude of
every intermediate float tensor as extra outputs, to prove a conversion clean on
real inputs and to find which tensors of the fp32 graph leave fp16's range.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx.external_data_helper import load_external_data_for_model

# `onnxruntime.transformers` puts its own directory on sys.path; import it as documented.
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from .blocks import block_of
from .data import Feed

# Decided by measurement (1 - cosine to fp32, mean / max over calibration feeds; tiny model,
# then the full-size random towers on 36 texts x 2 prompts and 18 photos):
#                       text tiny          vision tiny        text full          vision full
#   all fp16            2.7e-7 / 4.8e-7    9.7e-7 / 2.8e-6    3.9e-7 / 5.2e-7    4.5e-7 / 1.1e-6
#   LayerNorm fp32      6.9e-8 / 1.2e-7    7.2e-7 / 3.5e-6    3.8e-7 / 5.1e-7    2.3e-7 / 7.8e-7 *
#   Softmax fp32        2.7e-7 / 4.8e-7    9.7e-7 / 2.8e-6    3.9e-7 / 5.3e-7    4.5e-7 / 1.1e-6
#   GELU's Erf fp32     2.7e-7 / 4.8e-7         -             3.9e-7 / 5.2e-7         -
#   residual Adds fp32  2.8e-7 / 4.6e-7         -             4.9e-7 / 1.1e-6    9.6e-7 / 1.8e-6
# (* with the head fp32). LayerNorm is the one that pays: its input is the un-normalised sum
# of the residual stream, the widest-ranging tensor of a block (and TensorRT's maintainers
# name LayerNorm as where transformers overflow in fp16, NVIDIA/TensorRT#2564); its weights
# stay fp32 at no cost. Softmax and Erf gain nothing; fp32 residual Adds alone are worse (an
# extra fp16 rounding between the Add and an fp16 LayerNorm). The pooling head is kept fp32
# separately (`keep_fp32_head`, see `head_nodes`).
DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization",)
PROTOBUF_LIMIT = 2**31 - 1
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
FP16_MAX = float(np.finfo(np.float16).max)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes after the last transformer block that belong to no block: the pooling head.

    Text: the masked mean (MatMul of the mask with the token states, ReduceSum, Div); vision:
    the CLS Gather and final LayerNorm. The mean's MatMul sums up to 8192 token vectors
    before the division brings them back into range, so in fp16 any dimension whose mean
    |value| exceeds 8 overflows. Measured on the fp32 graphs with one token repeated: the
    sum reaches 32882 at 8192 tokens on the tiny model, and 9144 at 2048 tokens on the
    full-size random one (4.49 per token, so ~36800 at 8192): half of fp16's 65504 already
    with random weights.
    """
    nodes = list(model.graph.node)
    in_block = [i for i, node in enumerate(nodes) if block_of(node) is not None]
    if not in_block:  # no scope metadata (not a clipedge export, or stripped by an optimiser)
        return []
    return [node.name for node in nodes[in_block[-1] + 1 :] if block_of(node) is None]


def load_typed(path: Path, with_data: bool = True) -> onnx.ModelProto:
    """A graph with inferred types for every tensor; shape inference runs before the weights
    are read, so graphs over protobuf's 2 GB limit work too."""
    model = onnx.load(str(path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    # The exporter also lists weights in value_info; the fp16 converter would retype those
    # entries to fp16 even for weights it keeps fp32, and then cast fp32 weights "back".
    weights = {t.name for t in model.graph.initializer}
    for value in [v for v in model.graph.value_info if v.name in weights]:
        model.graph.value_info.remove(value)
    if with_data:
        load_external_data_for_model(model, str(Path(path).parent))
    return model


def save_model(model: onnx.ModelProto, dst: Path) -> Path:
    """Save inline, or with every weight in one `<name>.data` file when over 2 GB."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        os.remove(data)
    external = model.ByteSize() > PROTOBUF_LIMIT - (64 << 20)
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return dst


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    return types


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def remove_cast_round_trips(model: onnx.ModelProto) -> int:
    """Drop the fp16 step of X -> Cast(fp16) -> Cast(fp32) chains (in place).

    An fp32 X is read directly by the fp32 consumers; any other X (the int64 attention mask)
    gets one Cast straight to fp32. Returns the number of chains shortened.
    """
    graph = model.graph
    types = _elem_types(model)
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    graph_inputs = {i.name for i in graph.input}
    identities: list[onnx.NodeProto] = []
    renames: dict[str, str] = {}
    shortened = 0
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != TensorProto.FLOAT16:
            continue
        source, target = first.input[0], node.output[0]
        if types.get(source) != TensorProto.FLOAT:
            node.input[0] = source
        elif target not in graph_outputs:
            renames[target] = source
            identities.append(node)
        elif source not in graph_inputs:
            renames[source] = target  # the fp32 producer writes the graph output itself
            identities.append(node)
        else:
            continue
        shortened += 1
    for node in identities:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = renames.get(name, name)
    used = {name for node in graph.node for name in node.input} | graph_outputs
    for node in [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]:
        graph.node.remove(node)
    produced = {out for node in graph.node for out in node.output}
    for value in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(value)
    return shortened


def convert_to_fp16(
    src: Path,
    dst: Path,
    keep_fp32_ops: Iterable[str] = DEFAULT_FP32_OPS,
    keep_fp32_nodes: Iterable[str] = (),
    keep_fp32_head: bool = True,
) -> Path:
    """Write an fp16 copy of `src` with fp32 inputs/outputs and the named parts kept fp32."""
    model = load_typed(Path(src))
    block_nodes = set(keep_fp32_nodes) | (set(head_nodes(model)) if keep_fp32_head else set())
    model = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32_ops],
        node_block_list=sorted(block_nodes),
    )
    remove_cast_round_trips(model)
    drop_repeated_nodes(model)
    OnnxModel(model).topological_sort(is_deterministic=True)
    return save_model(model, Path(dst))


def drop_repeated_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes that repeat an earlier node exactly (returns how many).

    onnxruntime's converter before 1.32 inserts one `<tensor>_cast_to_fp32` Cast per fp32
    consumer of an fp16 tensor, all with the same name and output, and onnxruntime then
    refuses the graph ("Duplicate definition of name"). One of them is enough.
    """
    seen: set[bytes] = set()
    kept = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    dropped = len(model.graph.node) - len(kept)
    if dropped:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return dropped


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
    and frees each tensor at once (measured: 12 chained 256 MB tensors peak at 0.56 GB,
    3.4 GB otherwise). Returns the instrumented tensors with their declared element types.
    """
    graph = model.graph
    types = _elem_types(model)
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
    for feed in feeds:
        values = dict(zip(outputs, session.run(None, feed), strict=True))
        for i in range(len(names)):
            finite[i] &= bool(np.isfinite(values[f"_stats_{i}_sum"]))
            maxima[i] = max(maxima[i], float(values[f"_stats_{i}_max"]))
    return {
        name: TensorStats(bool(finite[i]), float(maxima[i]), FLOAT_LIMITS[dtype])
        for i, (name, dtype) in enumerate(names.items())
    }


def find_overflow(graph: Path, feeds: Sequence[Feed]) -> list[str]:
    """Tensors (graph inputs and every node output) that hold inf/NaN or exceed what their
    declared type holds, on any feed: [] means clean.

    What the CPU execution provider can and cannot show: it has no fp16 kernels for most
    ops (MatMul, Add, Mul, Softmax, ... on x86), so it runs each run of such ops in fp32
    between inserted Casts and drops the Cast pairs in between: a tensor the graph declares
    fp16 may never be stored in fp16 and then holds 90000 where a GPU would hold inf. The
    check therefore flags a tensor as overflowing when it holds inf/NaN *or* its magnitude
    exceeds what its declared type can hold (65504 for fp16): the first tensor that would
    overflow on the GPU is reported either way. It cannot see (a) overflow *inside* a
    kernel whose output is in range, should a GPU kernel accumulate in fp16 (a GEMM tactic,
    or normalisation statistics: ONNX LayerNormalization asks for fp32 ones through
    `stash_type`), (b) what an inf does downstream, since the CPU never produces it, nor
    (c) the numerics of TensorRT's fusions; compare an engine's outputs to fp32 for those.
    """
    return [name for name, stats in tensor_stats(graph, feeds).items() if stats.overflows]
