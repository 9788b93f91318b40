"""INT8 Q/DQ tower graphs for TensorRT (explicit quantization) and GPU execution providers.

`quantize_qdq` is onnxruntime's `quantize_static` set up the way TensorRT wants Q/DQ graphs:
- symmetric int8 everywhere (zero points 0: TensorRT supports no other), weights per output
  channel (MatMul weights [K, N] on axis 1, Conv weights on axis 0), stored as int8 with 7-bit
  values ([-64, 64], `reduce_range`) unless `weight_bits=8`. The graph also runs on
  onnxruntime's CPU provider: the calibration gate and the block search judge it there, and it
  is the CPU fallback. On x86 CPUs without VNNI/AMX that provider's int8 GEMM adds pairs of
  products in saturating int16 (see `cpu_int8`), so full 8-bit weights made the gate depend on
  the CPU: tiny vision tower, min cosine 0.99928 with exact products (what TensorRT computes)
  but 0.98602 on an AVX2 EPYC. With 7-bit weights every CPU and TensorRT compute the same
  integers (0.99820);
- Q/DQ only on the *inputs* of MatMul/Gemm/Conv, never on their outputs, so TensorRT fuses
  each DQ -> GEMM (-> bias Add) into one int8 kernel; LayerNorm, Softmax and the residual
  Adds read and write float (`bypass_qdq_for_float_ops`);
- the attention MatMuls (q.k^T and softmax.v: two activations) stay float by default. With
  int8 on both inputs (`attention_int8=True`, the pattern TensorRT's fused int8 attention
  needs) short inputs were as good, but a 512-token text lost accuracy: one per-tensor int8
  scale for softmax probabilities spread over 512 keys rounds most of them to zero (found
  running the int8 graph on a GPU; figures in docs/benchmarks.md);
- `weight_only_nodes` (the precision passes the vision MLP output projections) keep int8
  per-channel weights behind a DequantizeLinear but read their input in float: the one
  activation one int8 scale could not hold (size unchanged). TensorRT documents fused
  weight-only GEMMs for INT4 only, so it runs these 24 products in float from the
  de-quantized weights;
- biases stay float (`QuantizeBias` off): TensorRT adds a float bias in the GEMM epilogue,
  and onnx-tensorrt documents DequantizeLinear for int8 inputs only (not int32 biases);
- the pooling head after the last block (the text tower's masked-mean MatMul) stays float:
  an int8 GEMM there would only add error at the very end.
Pre-processing (`quant_pre_process`) is not used: its symbolic shape inference fails on the
text tower; on the vision tower its optimiser drops the node scope metadata that
`head_nodes` and the block search need, and without the optimiser it changed nothing
(tiny vision tower: the same cosine to six digits).

Calibration methods are onnxruntime's: "max" (MinMax), "entropy" and "percentile"
(histograms). onnxruntime's entropy uses 128 bins, too coarse for the text tower. The
histogram methods hold every calibrated tensor of one sample at once; "max" runs through
`tensor_stats` (`save_max_ranges`) at a third of their memory, so prefer it where memory is
short and let the block fallback search make up its accuracy (figures: docs/benchmarks.md).

The text tower's word embedding (250002 x 1024, ~1 GB, 46% of the fp32 text graph) is not a
MatMul weight; `quantize_embedding_rows` stores it as int8 rows with one fp32 scale per row,
de-quantised after the lookup. Embedding and Q/DQ together bring both towers to about a
quarter of their fp32 size.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorsData,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.transformers.onnx_model import OnnxModel

from .feeds import Feed, RowFeedReader
from .fp16 import head_nodes
from .graph_io import save_model
from .ort_advice import without_preprocessing_advice
from .tensor_stats import tensor_stats

log = logging.getLogger(__name__)

METHODS = {
    "max": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")


def _embedding_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gathers along axis 0 of a 2-D float weight that nothing else reads: embedding lookups."""
    tables = {
        t.name
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
    }
    gathers = [
        node
        for node in model.graph.node
        if node.op_type == "Gather"
        and node.input[0] in tables
        and next((a.i for a in node.attribute if a.name == "axis"), 0) == 0
    ]
    readers = Counter(name for node in model.graph.node for name in node.input)
    return [node for node in gathers if readers[node.input[0]] == 1]


def quantize_embedding_rows(
    model: onnx.ModelProto, exclude_nodes: Iterable[str] = ()
) -> onnx.ModelProto:
    """Store every embedding table as int8 rows with one fp32 scale per row (in place).

    Gather(table, ids) becomes Gather(table_int8, ids) -> Cast -> Mul(Gather(scales, ids)):
    only 1/4 of the bytes are read per token, and every op is one TensorRT's parser takes.
    Row-wise scales keep rare tokens with small rows as precise as frequent large ones; a
    gathered value is within scale/2 of the fp32 one.
    """
    exclude = set(exclude_nodes)
    for node in [n for n in _embedding_gathers(model) if n.name not in exclude]:
        name, ids, output = node.input[0], node.input[1], node.output[0]
        # By index: removing a 1 GB TensorProto by value would compare it field by field.
        position = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
        table = numpy_helper.to_array(model.graph.initializer[position])
        peak = np.abs(table).max(axis=1, keepdims=True)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        quantized = np.clip(np.rint(table / scales), -127, 127).astype(np.int8)
        del table, model.graph.initializer[position]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, name + "_int8"),
                numpy_helper.from_array(scales, name + "_row_scale"),
            ]
        )
        index = list(model.graph.node).index(node)
        del model.graph.node[index]
        replacement = [
            helper.make_node("Gather", [name + "_int8", ids], [output + "_int8"], name=node.name),
            helper.make_node(
                "Cast",
                [output + "_int8"],
                [output + "_wide"],
                to=TensorProto.FLOAT,
                name=node.name + "_cast",
            ),
            helper.make_node(
                "Gather",
                [name + "_row_scale", ids],
                [output + "_scale"],
                name=node.name + "_scale",
            ),
            helper.make_node(
                "Mul", [output + "_wide", output + "_scale"], [output], name=node.name + "_dequant"
            ),
        ]
        for offset, new in enumerate(replacement):
            model.graph.node.insert(index + offset, new)
        for value in [v for v in model.graph.value_info if v.name in (name, output)]:
            model.graph.value_info.remove(value)
        log.info("embedding %s %s stored as int8 rows", name, list(quantized.shape))
    return model


def attention_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls of two activations (q.k^T, softmax.v, the mean-pool), not of a weight."""
    weights = {t.name for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and not weights.intersection(node.input)
    ]


def bypass_qdq_for_float_ops(model: onnx.ModelProto) -> int:
    """Let every op that is not quantized read the float tensor, not its Q/DQ copy.

    onnxruntime gives a tensor one shared Q/DQ pair and rewires *all* its consumers to the
    DQ output when any consumer is quantized; in the post-LN text tower that puts the
    residual branch (LayerNorm output -> residual Add) through int8 as well. Returns the
    number of inputs rewired.
    """
    nodes = list(model.graph.node)
    quantize_input = {n.output[0]: n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    float_source = {
        n.output[0]: quantize_input[n.input[0]]
        for n in nodes
        if n.op_type == "DequantizeLinear" and n.input[0] in quantize_input
    }
    rewired = 0
    for node in nodes:
        if node.op_type in (*QUANTIZED_OPS, "QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_source:
                node.input[i] = float_source[name]
                rewired += 1
    return rewired


def make_weight_only(model: onnx.ModelProto, nodes: Iterable[str]) -> int:
    """Feed the named quantized ops their float activation: int8 weights (per channel, still
    de-quantized by a DequantizeLinear) with a float input. Returns how many were changed.

    For ops whose *input* has outliers that one int8 scale cannot hold (the vision MLP's
    output projection after its sub-LayerNorm): the weight keeps its int8 size, only the
    activation's rounding goes.
    """
    wanted = set(nodes)
    graph_nodes = list(model.graph.node)
    producer = {out: n for n in graph_nodes for out in n.output}
    changed = 0
    for node in graph_nodes:
        if node.name not in wanted:
            continue
        dequantize = producer.get(node.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = producer.get(dequantize.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue  # input 0 is a weight (not the activation)
        node.input[0] = quantize.input[0]
        changed += 1
    # Drops the activation Q/DQ pairs nothing reads any more, and their scales.
    OnnxModel(model).prune_graph(allow_remove_graph_inputs=False)
    return changed


def save_max_ranges(graph: Path, feeds: Sequence[Feed], path: Path) -> Path:
    """The "max" calibration: symmetric max-|x| range of every float tensor over `feeds`,
    written as an onnxruntime calibration cache for `quantize_static`.

    onnxruntime's MinMax calibrator computes the same ranges, but appends its ReduceMin/Max
    nodes at the end of the graph, so every intermediate of a sample stays alive until they
    run (out of memory on the full-size vision tower). `tensor_stats` reduces each tensor next
    to its producer.
    """
    ranges = {}
    for name, stats in tensor_stats(graph, feeds).items():
        if not stats.finite:
            raise ValueError(f"the calibration feeds make {name} inf or NaN in the fp32 graph")
        peak = np.array([stats.max_abs], dtype=np.float32)  # the shape MinMax gives
        ranges[name] = (-peak, peak)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), path)
    return path


def quantize_qdq(
    src: Path,
    dst: Path,
    feeds: Sequence[Feed],
    method: str = "max",
    exclude_nodes: Iterable[str] = (),
    percentile: float = 99.99,
    attention_int8: bool = False,
    weight_only_nodes: Iterable[str] = (),
    weight_bits: int = 7,
) -> Path:
    """Write an INT8 Q/DQ copy of `src` calibrated on `feeds` (graph inputs, batched).

    `exclude_nodes` stay float, embedding lookups included; `weight_only_nodes` keep int8
    weights but a float input (`make_weight_only`). `percentile` applies to the "percentile"
    method only; `attention_int8` quantizes attention's activation MatMuls too.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, not {method!r}")
    model = onnx.load(str(src))
    exclude = set(exclude_nodes)
    if not attention_int8:
        exclude.update(attention_matmuls(model))
    quantize_embedding_rows(model, exclude)
    exclude.update(head_nodes(model))
    with tempfile.TemporaryDirectory(prefix="clipedge-qdq-") as tmp:
        # Calibrate the graph with the int8 embedding, as production will run it; without
        # the embedding the text tower fits in one protobuf (1.2 GB).
        prepared = save_model(model, Path(tmp) / "prepared.onnx")
        large = prepared.with_name(prepared.name + ".data").exists()
        del model
        reader, cache = None, None
        if method == "max":
            cache = save_max_ranges(prepared, feeds, Path(tmp) / "ranges.json")
        else:
            reader = RowFeedReader(feeds)
        staged = Path(tmp) / "quantized.onnx"
        # The histogram calibrators print their progress; keep it out of the caller's output.
        with contextlib.redirect_stdout(io.StringIO()), without_preprocessing_advice():
            quantize_static(
                str(prepared),
                str(staged),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                reduce_range=weight_bits == 7,  # exact on non-VNNI CPUs too (docstring)
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(exclude),
                use_external_data_format=large,
                calibrate_method=METHODS[method],
                calibration_cache_path=cache,
                extra_options={
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    "CalibTensorRangeSymmetric": True,
                    "CalibStridedMinMax": 1,
                    "CalibPercentile": percentile,
                    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                    "QuantizeBias": False,
                },
            )
        quantized = onnx.load(str(staged))
    bypass_qdq_for_float_ops(quantized)
    make_weight_only(quantized, weight_only_nodes)
    return save_model(quantized, Path(dst))
