"""Static checks that an exported graph will build as a TensorRT engine with dynamic shapes.

`TENSORRT_OPS` is the subset of TensorRT 10's ONNX parser support matrix (onnx-tensorrt
docs/operators.md) that a transformer graph can reasonably contain. Anything else (custom
domains, sequence ops, data-dependent output shapes, control flow whose branches depend on
shapes) fails the check, so a graph that passes here does not surprise a user at build time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx

TENSORRT_OPS = frozenset(
    """
    Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Conv Cos
    DequantizeLinear Div Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements
    GatherND Gelu Gemm Greater GreaterOrEqual Identity LayerNormalization Less LessOrEqual Log
    MatMul Max Min Mul Neg Not Or Pow QuantizeLinear Range Reciprocal ReduceL2 ReduceMax
    ReduceMean ReduceMin ReduceSum Relu Reshape Shape Sigmoid Sign Sin Slice Softmax Split
    Sqrt Squeeze Sub Tanh Tile Transpose Unsqueeze Where
    """.split()
)

# Ops TensorRT parses but that make shapes depend on data or need per-shape control flow.
SHAPE_HOSTILE_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "Unique", "Compress", "TopK"})

# Inputs that TensorRT requires to be constants (build-time values) for these ops.
CONSTANT_INPUTS = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "Conv": (1,)}


@dataclass
class GraphReport:
    """Op histogram and every problem found; `ok` is what the export and the tests assert."""

    op_histogram: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def histogram_text(self) -> str:
        return ", ".join(f"{op} {n}" for op, n in self.op_histogram.most_common())


def check_graph(model: onnx.ModelProto) -> GraphReport:
    """List the graph's ops and every construct that blocks a dynamic-shape TensorRT build."""
    report = GraphReport()
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    for node in graph.node:
        report.op_histogram[node.op_type] += 1
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            report.problems.append(f"{where}: custom domain {node.domain!r}")
        elif node.op_type in SHAPE_HOSTILE_OPS:
            report.problems.append(f"{where}: data-dependent shapes or control flow")
        elif node.op_type not in TENSORRT_OPS:
            report.problems.append(f"{where}: not in TensorRT's ONNX parser support")
        for index in CONSTANT_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] not in constants:
                report.problems.append(f"{where}: input {index} must be a constant for TensorRT")
    for tensor in list(graph.input) + list(graph.output):
        elem = tensor.type.tensor_type.elem_type
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64):
            report.problems.append(f"graph I/O {tensor.name!r}: unsupported dtype {elem}")
    return report
