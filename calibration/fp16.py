"""FP16 tower graphs for GPUs, and the FP16 input of strongly typed TensorRT builds.

TensorRT 11 (and TensorRT 10 with strong typing) takes each layer's precision from the graph's
tensor types, so the graph itself must say which parts stay fp32. The conversion is
onnxruntime's `convert_float_to_float16` with fp32 graph inputs and outputs; ops in
`keep_fp32_ops` and the pooling head after the last transformer block stay fp32 (see
`DEFAULT_FP32_OPS` for why). Two clean-ups make the result fit for TensorRT:
the fp32 -> fp16 -> fp32 Cast pairs that the converter leaves between neighbouring fp32 nodes
are removed (they would round fp32 tensors through fp16), and the nodes are put back in
topological order (the converter appends its Casts at the end of the node list).

`find_overflow` runs a graph (through `tensor_stats`) with the finiteness and the largest
magnitude of every intermediate float tensor as extra outputs, to prove a conversion clean on
real inputs and to find which tensors of the fp32 graph leave fp16's range.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import onnx
from onnx import TensorProto

# `onnxruntime.transformers` puts its own directory on sys.path; import it as documented.
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from .blocks import block_of
from .feeds import Feed
from .graph_io import elem_types, load_typed, save_model
from .tensor_stats import tensor_stats

# Decided by measurement (docs/benchmarks.md, "fp16: which ops stay fp32"): LayerNorm is the one
# that pays: its input is the un-normalised sum of the residual stream, the widest-ranging
# tensor of a block (and TensorRT's maintainers name LayerNorm as where transformers overflow
# in fp16, NVIDIA/TensorRT#2564); its weights stay fp32 at no cost. Softmax and Erf gain
# nothing; fp32 residual Adds alone are worse (an extra fp16 rounding between the Add and an
# fp16 LayerNorm). The pooling head is kept fp32 separately (`keep_fp32_head`, see
# `head_nodes`).
DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization",)


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


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def remove_cast_round_trips(model: onnx.ModelProto) -> int:
    """Drop the fp16 step of X -> Cast(fp16) -> Cast(fp32) chains (in place).

    An fp32 X is read directly by the fp32 consumers; any other X (the int64 attention mask)
    gets one Cast straight to fp32. Returns the number of chains shortened.
    """
    graph = model.graph
    types = elem_types(model)
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
