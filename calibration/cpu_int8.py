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

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from .feeds import RowFeedReader
from .graph_io import needs_external_data
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
        quantize_dynamic,
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
        # Two passes, the MatMuls then the Gather, give the same graph (outputs equal bit for
        # bit) at a lower peak: quantising the 1 GB word-embedding table takes ~5 GB of
        # transients, so in one pass with every fp32 weight loaded the full-size text tower
        # peaked at 8.7 GB, in two at 6.7 / 7.0 GB (docs/benchmarks.md, "Calibration memory").
        matmuls = dst.with_name(dst.stem + ".matmuls.onnx")
        for ops, source, target in ((["MatMul"], src, matmuls), (["Gather"], matmuls, dst)):
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
        for leftover in (matmuls, matmuls.with_name(matmuls.name + ".data")):
            leftover.unlink(missing_ok=True)
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
