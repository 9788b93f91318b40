"""int8 graphs for CPUs: onnxruntime's CPU execution provider and OpenVINO.

onnxruntime forms (`quantize_cpu`), because they hit different CPU kernels:

- "dynamic": weights int8 per output channel, activations quantised per call
  (DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime into DynamicQuantizeMatMul that
  runs on VNNI/AMX); no calibration data needed. The word-embedding Gather is stored 8-bit too
  (a quarter of the text tower's bytes).
- "qdq_u8": static QDQ with uint8 activations and int8 weights on the weight MatMuls only.
  Signed int8 activations have no fast x86 kernel and softmax / attention MatMuls
  (activation x activation) lose accuracy and speed when quantised, so they stay float.
- "qoperator": the same choice of nodes written as QLinearMatMul operators.

On the full-size towers (`benchmarks/bench_cpu.py`, 2 Zen 4 cores, VNNI, no AMX) "dynamic" wins:
image 2.6 s, 8x32 text 0.30 s, cosine >= 0.993. The static forms were slower (image 3.9-6.1 s,
8x32 text 0.64-0.89 s), reached only 0.98-0.99 cosine on the image and took ~20 GB to
calibrate the vision tower (onnxruntime records every MatMul tensor, attention maps included).

OpenVINO form (`quantize_openvino`): NNCF post-training int8 saved as OpenVINO IR, with
attention kept in the inference precision (bf16) and the vision MLP output projections on
bf16 inputs with int8 weights: the fastest CPU path measured (bench_cpu run 3: image 2.16 s,
8x32 text 0.22 s, 1x512 text 0.52 s; held-out cosine 0.9925 image, 0.9990 text).

Every form keeps the graph's inputs and outputs, so the runtime loads it like the fp32 graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .feeds import RowFeedReader
from .graph_io import needs_external_data
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


def quantize_cpu(
    src: Path,
    dst: Path,
    mode: str,
    feeds: list[dict[str, np.ndarray]] | None = None,
    exclude_nodes: Iterable[str] = (),
) -> Path:
    """Write an int8 form of the fp32 graph `src` to `dst` and return `dst`.

    `feeds` (graph inputs from `calibration.data.tower_feeds`) set the activation ranges of
    the static forms; `exclude_nodes` stay float (mixed precision for sensitive blocks).
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
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul", "Gather"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
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


def activation_matmuls(model: Any) -> list[str]:
    """Names of an OpenVINO model's MatMuls that multiply two activations (attention)."""

    def is_constant(node: Any) -> bool:
        while node.get_type_name() in ("Convert", "Reshape", "Transpose") and node.inputs():
            if (
                node.get_type_name() != "Convert"
                and node.input_value(0).get_node().get_type_name() != "Constant"
            ):
                return False
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() == "MatMul"
        and not any(is_constant(op.input_value(i).get_node()) for i in range(2))
    ]


def quantize_openvino(
    src: Path,
    dst: Path,
    feeds: list[dict[str, np.ndarray]],
    exclude_nodes: Iterable[str] = (),
    smooth_quant_alpha: float = -1.0,
    attention_int8: bool = False,
    weight_only_nodes: Iterable[str] = (),
) -> Path:
    """NNCF post-training int8 of an fp32 graph for OpenVINO, saved as IR (`dst` ends in .xml).

    TRANSFORMER preset (asymmetric activations, per-channel symmetric weights, fast bias
    correction). SmoothQuant is off by default (a negative alpha): with NNCF's default 0.95 the
    tiny tower fell to cosine 0.975 against 0.998 without it. Attention's activation x
    activation MatMuls stay bf16 unless `attention_int8`.
    """
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src))
    exclude = list(exclude_nodes)
    weight_only = set(weight_only_nodes) - set(exclude)
    ignored = [*exclude, *weight_only]
    if not attention_int8:
        ignored += activation_matmuls(model)
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
    )
    quantized = nncf.quantize(
        model,
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        fast_bias_correction=True,
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        advanced_parameters=advanced,
    )
    if weight_only:
        others = [
            op.get_friendly_name()
            for op in quantized.get_ordered_ops()
            if op.get_type_name() == "MatMul" and op.get_friendly_name() not in weight_only
        ]
        quantized = nncf.compress_weights(
            quantized,
            mode=nncf.CompressWeightsMode.INT8_SYM,
            ignored_scope=nncf.IgnoredScope(names=others, validate=False),
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst
