"""The lower precisions an export can add, each a converter from the fp32 graph.

- `fp16`: for GPUs and as TensorRT 11's FP16 input; fp32 inputs/outputs, sensitive ops fp32.
- `int8`: Q/DQ graph for TensorRT and GPU execution providers (calibrated activation scales,
  per-channel weights, embedding table int8 per row).
- `int8-cpu`: the onnxruntime CPU int8 form that measured fastest at cosine >= 0.99 here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import Feed
from .search import Converter


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    device: str
    default_target: float
    needs_calibration: bool
    make_converter: Callable[[Path, Sequence[Feed], str], Converter]


def _fp16(src: Path, feeds: Sequence[Feed], method: str) -> Converter:
    from .fp16 import convert_to_fp16

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        return convert_to_fp16(src, dst, keep_fp32_nodes=keep_float)

    return convert


def _int8_qdq(src: Path, feeds: Sequence[Feed], method: str) -> Converter:
    from .int8_qdq import quantize_qdq

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        return quantize_qdq(src, dst, list(feeds), method=method, exclude_nodes=keep_float)

    return convert


# The onnxruntime CPU form that measured fastest at cosine >= 0.99 (benchmarks/bench_cpu.py).
CPU_INT8_MODE = "dynamic"


def _int8_cpu(src: Path, feeds: Sequence[Feed], method: str) -> Converter:
    from .cpu_int8 import quantize_cpu

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        return quantize_cpu(src, dst, CPU_INT8_MODE, list(feeds), exclude_nodes=keep_float)

    return convert


PRECISIONS = {
    "fp16": PrecisionSpec("fp16", "gpu", 0.999, False, _fp16),
    "int8": PrecisionSpec("int8", "gpu", 0.99, True, _int8_qdq),
    "int8-cpu": PrecisionSpec("int8-cpu", "cpu", 0.99, False, _int8_cpu),
}
CALIBRATION_METHODS = ("max", "entropy", "percentile")
