"""A graph with its attention fused for onnxruntime's CPU provider.

onnxruntime runs the exported attention (MatMul, the text tower's mask Add, Softmax, MatMul)
as written, so the scores of every head are materialised: [batch, heads, L, L] floats, 4.3 GB
per layer (and as much again for the softmax) for one 8192-token text, 2.2 GB for 32 images
of 1025 patches. Its contrib op
`com.microsoft.MultiHeadAttention` has a CPU flash-attention kernel (MLAS, query and key
blocks sized to the L2 cache) whose memory is linear in L, but only when no key padding
mask or attention bias is given. The padding mask is therefore folded into the product: q
gets one more component fixed at 1 and k one more holding the mask's bias (0 or -10000), so
q'·k' = q·k + bias, the very sum the exported graph forms. The query scale is already in the
weights (`scale=1`). The vision tower's attention has no mask and is fused as it is. No
weight changes: the fused graph reads the fp32 graph's external data file.

Only onnxruntime reads com.microsoft ops: OpenVINO, TensorRT and onnxruntime's GPU
providers keep the portable graph (the manifest's `file`); the CPU backend loads this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# Constant inputs of the fused nodes (shared by every layer).
PAD, ONE, TO_3D = "fused_attention/pad", "fused_attention/one", "fused_attention/to_3d"


@dataclass(frozen=True)
class _Attention:
    """One exported attention: q, k, v [B, heads, L, head_dim], the mask bias [B, 1, 1, L]
    (None: unmasked, as in the vision tower), the context [B, L, heads*head_dim] it ends in,
    and the nodes it replaces."""

    query: str
    key: str
    value: str
    bias: str | None
    context: str
    heads: int
    removed: tuple[onnx.NodeProto, ...]
    anchor: onnx.NodeProto  # the fused nodes go where this one was


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


def _dims(value_info: dict[str, onnx.ValueInfoProto], name: str) -> list[int | str] | None:
    info = value_info.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in info.type.tensor_type.shape.dim
    ]


def _find(graph: onnx.GraphProto) -> list[_Attention]:
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    value_info = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}

    def only_consumer(name: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    found = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        before = producer.get(softmax.input[0])
        if axis not in (-1, 3) or before is None or len(consumers[before.output[0]]) != 1:
            continue
        bias, removed = None, [softmax]
        scores = before
        if before.op_type == "Add":  # masked: scores + bias
            removed.append(before)
            scores = next(
                (producer[i] for i in before.input if producer.get(i, before).op_type == "MatMul"),
                None,
            )
            if scores is None or len(consumers[scores.output[0]]) != 1:
                continue
            bias = next(i for i in before.input if i != scores.output[0])
        if scores.op_type != "MatMul":
            continue
        key_t = producer.get(scores.input[1])
        probs = only_consumer(softmax.output[0], "MatMul")
        to_bsnh = only_consumer(probs.output[0], "Transpose") if probs else None
        merge = only_consumer(to_bsnh.output[0], "Reshape") if to_bsnh else None
        if (
            merge is None
            or key_t is None
            or key_t.op_type != "Transpose"
            or _perm(key_t) != [0, 1, 3, 2]
            or probs.input[0] != softmax.output[0]
            or _perm(to_bsnh) != [0, 2, 1, 3]
        ):
            continue
        query_dims = _dims(value_info, scores.input[0])
        if query_dims is None or len(query_dims) != 4 or not isinstance(query_dims[1], int):
            continue
        if bias is not None:
            bias_dims = _dims(value_info, bias)
            if bias_dims is None or len(bias_dims) != 4 or bias_dims[1:3] != [1, 1]:
                continue
        removed += [scores, probs, to_bsnh, merge]
        if len(consumers[key_t.output[0]]) == 1:
            removed.append(key_t)
        found.append(
            _Attention(
                query=scores.input[0],
                key=key_t.input[0],
                value=probs.input[1],
                bias=bias,
                context=merge.output[0],
                heads=query_dims[1],
                removed=tuple(removed),
                anchor=probs,
            )
        )
    return found


def _to_3d(name: str, prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """[B, heads, L, d] -> [B, L, heads*d], the layout MultiHeadAttention reads."""
    out = f"{prefix}_3d"
    return [
        helper.make_node("Transpose", [name], [f"{prefix}_bsnh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{prefix}_bsnh", TO_3D], [out]),
    ], out


def _fused_nodes(
    attention: _Attention, prefix: str, bias_column: str | None
) -> list[onnx.NodeProto]:
    """MultiHeadAttention on q, k, v; when masked, q with a component of 1 and k with the
    mask's bias."""
    nodes, query, key = [], attention.query, attention.key
    if bias_column is not None:
        query, key = f"{prefix}/q_one", f"{prefix}/k_bias"
        nodes += [
            helper.make_node("Pad", [attention.query, PAD, ONE], [query], mode="constant"),
            helper.make_node("Concat", [attention.key, bias_column], [key], axis=-1),
        ]
    inputs = []
    for name, tag in ((query, "q"), (key, "k"), (attention.value, "v")):
        reshaped, out = _to_3d(name, f"{prefix}/{tag}")
        nodes += reshaped
        inputs.append(out)
    nodes.append(
        helper.make_node(
            "MultiHeadAttention",
            inputs,
            [attention.context],
            name=f"{prefix}/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=attention.heads,
            scale=1.0,
        )
    )
    return nodes


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every self-attention of `model` into MultiHeadAttention, in place.

    Returns how many were fused (0: nothing matched, the model is unchanged)."""
    graph = model.graph
    found = _find(graph)
    if not found:
        return 0
    constants = [
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 0, 1], np.int64), PAD),
        numpy_helper.from_array(np.array(1.0, np.float32), ONE),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), TO_3D),
    ]
    bias_columns: dict[tuple[str, int], str] = {}
    fused_at: dict[int, list[onnx.NodeProto]] = {}
    for index, attention in enumerate(found):
        prefix = f"fused_attention/{index}"
        nodes: list[onnx.NodeProto] = []
        column = bias_columns.get((attention.bias, attention.heads))
        if column is None and attention.bias is not None:
            # [B, 1, 1, L] -> [B, heads, L, 1], once per mask and head count
            shape, column = f"{prefix}/heads", f"{prefix}/bias_column"
            constants.append(
                numpy_helper.from_array(np.array([1, attention.heads, 1, 1], np.int64), shape)
            )
            nodes += [
                helper.make_node(
                    "Transpose", [attention.bias], [f"{prefix}/bias_t"], perm=[0, 1, 3, 2]
                ),
                helper.make_node("Expand", [f"{prefix}/bias_t", shape], [column]),
            ]
            bias_columns[(attention.bias, attention.heads)] = column
        nodes += _fused_nodes(attention, prefix, column)
        for node in nodes:  # named after their output: tools match nodes by name
            node.name = node.name or node.output[0]
        fused_at[id(attention.anchor)] = nodes

    removed = {id(node) for attention in found for node in attention.removed}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        kept.extend(fused_at.get(id(node), []))
        if id(node) not in removed:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            kept.append(copy)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(constants)
    read = {name for node in graph.node for name in node.input}
    unread = [t for t in graph.initializer if t.name not in read]  # e.g. removed shapes
    for tensor in unread:
        graph.initializer.remove(tensor)
    live = {name for node in graph.node for name in node.output}
    kept_info = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(found)


def cpu_graph_name(graph_name: str) -> str:
    """`text.onnx` -> `text.onnxruntime-cpu.onnx`."""
    stem = graph_name.removesuffix(".onnx")
    return f"{stem}.onnxruntime-cpu.onnx"


def write_onnxruntime_cpu_graph(graph: Path) -> Path | None:
    """Write the fused form of `graph` beside it; None when it has no attention to fuse.

    Weights in an external data file stay there, shared by both graphs (the data's location
    is relative to the graph, hence beside it); weights inside the graph are copied."""
    model = onnx.load(str(graph), load_external_data=False)
    if fuse_attention(model) == 0:
        return None
    target = graph.with_name(cpu_graph_name(graph.name))
    onnx.save(model, str(target))
    return target
