"""int8 graphs for onnxruntime's CPU execution provider.

onnxruntime forms (`quantize_cpu`), because they hit different CPU kernels:

- "dynamic": weights int8 per output channel, activations quantised per call
  (DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime into DynamicQuantizeMatMul);
  no calibration data needed. The word-embedding Gather is stored 8-bit too
  (a quarter of the text tower's bytes).
- "qdq_u8": static QDQ with uint8 activations and int8 weights on the weight MatMuls only.
  Signed int8 activations have no fast x86 kernel and softmax / attention MatMuls
  (activation x activation) lose accuracy and speed when quantised, so they stay float.
- "qoperator": the same choice of nodes written as QLinearMatMul operators.

On the full-size towers (`python -m benchmarks.cpu`) "dynamic" is the fastest and the most
accurate form; the static forms were slower, less accurate on the image and costly to calibrate
(onnxruntime records every MatMul tensor, attention maps included). Figures:
docs/benchmarks.md.

The OpenVINO form (`int8-ov`) is NNCF's, in `openvino_int8.py`.

Every form keeps the graph's inputs and outputs, so the runtime loads it like the fp32 graph.

Weights are 7-bit (`reduce_range`, values in [-64, 64]) by default, because the graph may run
on CPUs other than the one that built it; 8-bit (`weight_bits=8`) only for CPUs that add int8
products in int32 (`clipedge.engine.cpu_features`, which the runtime checks). On x86 CPUs
without VNNI or AMX (AVX2 or plain AVX-512: older Xeons, and AMD EPYC VMs that expose AVX2
only) onnxruntime's int8 GEMM multiplies uint8 activations by int8 weights with vpmaddubsw,
which adds each pair of products into an int16 and saturates: 255 * 127 * 2 = 64770 > 32767.
VNNI and AMX add in int32, so the same graph passed on the AMX Xeon and failed on an AVX2 EPYC
(tiny vision tower, "dynamic": min cosine 0.9985 with exact integer products, as measured on
the Xeon; 0.9507 from onnxruntime on the EPYC, whose MatMulInteger outputs equal a model of
int16 pair saturation bit for bit). 7-bit weights keep every pair in range (255 * 64 * 2 =
32640), so onnxruntime computes the exact integer products on every x86 CPU, for one bit of
weight precision (0.9978) and no change of kernel or speed. onnxruntime documents
`reduce_range` for this case (U8S8 on non-VNNI x86).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import (
    load_external_data_for_model,
    load_external_data_for_tensor,
    uses_external_data,
)

from .feeds import RowFeedReader
from .graph_io import needs_external_data, save_model
from .ort_advice import without_preprocessing_advice
from .report import graph_bytes

MODES = ("dynamic", "qdq_u8", "qoperator")
# onnx protobufs cannot exceed 2 GB: larger graphs keep their weights in `<name>.data`.


def weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant weight.

    Attention's score and context MatMuls (and the text pooling MatMul) multiply two
    activations; they are left out.
    """
    model = onnx.load(str(path), load_external_data=False)
    constants = {init.name for init in model.graph.initializer}
    constants |= {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in constants
    ]


def _quantize_dynamic_in_two_passes(
    src: Path, dst: Path, work: Path, excluded: list[str], weight_bits: int, external: bool
) -> None:
    """The MatMuls first, on the graph without its Gather tables, then the tables.

    The same graph as one pass (tested bit for bit) at a lower peak: onnxruntime's quantiser
    holds three copies of the graph it is given (its own, a shape-inferred copy and the
    caller's) and quantising the 1 GB word-embedding table takes ~3 GB of transients. The
    full-size text tower peaked at 8.7 GB in one pass, 7.9 GB in two (both on the whole
    graph), and 7.1 GB with the tables set aside for the MatMul pass (docs/benchmarks.md,
    "Calibration memory").
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(source: Path, target: Path, ops: list[str]) -> None:
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=ops,
            per_channel=True,
            weight_type=QuantType.QInt8,
            reduce_range=weight_bits == 7,
            nodes_to_exclude=excluded,
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )

    without_tables, tables = _tables_as_inputs(src, work / "without-tables.onnx")
    quantize(without_tables, work / "matmuls.onnx", ["MatMul"])
    _tables_back(work / "matmuls.onnx", tables, src.parent, work / "with-tables.onnx")
    quantize(work / "with-tables.onnx", dst, ["Gather"])


def _tables_as_inputs(src: Path, dst: Path) -> tuple[Path, list[onnx.TensorProto]]:
    """Write `src` with every Gather table (an initializer gathered from) turned into a graph
    input; the tables are never read. Returns `dst` and the tables as `src` stores them
    (inline, or a reference to its data file)."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    gathered = {node.input[0] for node in graph.node if node.op_type == "Gather"}
    tables = []
    for init in [init for init in graph.initializer if init.name in gathered]:
        table = onnx.TensorProto()
        table.CopyFrom(init)
        tables.append(table)
        graph.initializer.remove(init)
        graph.input.append(
            onnx.helper.make_tensor_value_info(table.name, table.data_type, table.dims)
        )
    load_external_data_for_model(model, str(src.parent))
    save_model(model, dst, external=True)
    return dst, tables


def _tables_back(src: Path, tables: list[onnx.TensorProto], tables_dir: Path, dst: Path) -> None:
    """Write `src` with the `tables` set aside by `_tables_as_inputs` as initializers again."""
    model = onnx.load(str(src))
    names = {table.name for table in tables}
    for value in [v for v in model.graph.input if v.name in names]:
        model.graph.input.remove(value)
    for table in tables:
        restored = model.graph.initializer.add()
        restored.CopyFrom(table)
        if uses_external_data(restored):
            load_external_data_for_tensor(restored, str(tables_dir))
            restored.data_location = onnx.TensorProto.DEFAULT
            del restored.external_data[:]
    save_model(model, dst, external=True)


@without_preprocessing_advice()
def quantize_cpu(
    src: Path,
    dst: Path,
    mode: str,
    feeds: list[dict[str, np.ndarray]] | None = None,
    exclude_nodes: Iterable[str] = (),
    weight_bits: int = 7,
) -> Path:
    """Write an int8 form of the fp32 graph `src` to `dst` and return `dst`.

    `feeds` (graph inputs from `calibration.data.tower_feeds`) set the activation ranges of
    the static forms; `exclude_nodes` stay float (mixed precision for sensitive blocks);
    `weight_bits` 7 or 8 (module docstring).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("dst must differ from src: the fp32 graph is the accuracy reference")
    dst.parent.mkdir(parents=True, exist_ok=True)
    excluded = list(exclude_nodes)
    external = needs_external_data(graph_bytes(src))
    if mode == "dynamic":
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as work:
            _quantize_dynamic_in_two_passes(src, dst, Path(work), excluded, weight_bits, external)
        return dst
    if not feeds:
        raise ValueError(f"mode {mode!r} needs calibration feeds")
    weights = [name for name in weight_matmuls(src) if name not in set(excluded)]
    quantize_static(
        src,
        dst,
        RowFeedReader(feeds),
        quant_format=QuantFormat.QDQ if mode == "qdq_u8" else QuantFormat.QOperator,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=weights,
        nodes_to_exclude=excluded,
        per_channel=True,
        reduce_range=weight_bits == 7,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        extra_options={
            "MatMulConstBOnly": True,
            # Float MatMul outputs: quantising them only adds error, the next op is float anyway.
            "OpTypesToExcludeOutputQuantization": ["MatMul"],
            "CalibStridedMinMax": 1,
        },
    )
    return dst
