"""The lower precisions an export can add, each a converter from the fp32 graph.

- `fp16`: for GPUs and as TensorRT 11's FP16 input; fp32 inputs/outputs, sensitive ops fp32.
- `int8`: Q/DQ graph for TensorRT and GPU execution providers (calibrated activation scales,
  per-channel weights, embedding table int8 per row).
- `int8-cpu`: the onnxruntime CPU int8 form that measured fastest at cosine >= 0.99.
- `int8-ov`: NNCF int8 as OpenVINO IR (`.xml` + `.bin`), the fastest CPU path measured on
  x86 (`python -m benchmarks.cpu`); needs the `nncf` extra to build and OpenVINO to run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .feeds import Feed
from .search import Converter


@dataclass(frozen=True)
class Conversion:
    """What every converter is told: the activation-range method of the Q/DQ graph and the
    range of int8 weights, 7 bits (exact on every CPU) or 8 (exact where int8 products add
    in int32: `clipedge.engine.cpu_features`; the manifest records it and the runtime will
    not load such a graph on another CPU)."""

    method: str = "max"
    weight_bits: int = 7


@dataclass(frozen=True)
class PrecisionSpec:
    """How to build one precision and where its graph runs.

    `device` is the manifest's device class ("gpu", "cpu" or "openvino"); `suffix` is the
    graph file's (".onnx", or ".xml" for OpenVINO IR); `requires` names the modules the
    converter imports, checked before any work starts.
    """

    name: str
    device: str
    default_target: float
    needs_calibration: bool
    make_converter: Callable[[Path, Sequence[Feed], Conversion], Converter]
    suffix: str = ".onnx"
    requires: tuple[str, ...] = ()
    # Set when the converter has its own calibration scheme and ignores --calibration-method.
    fixed_method: str | None = None
    install_hint: str = "pip install 'clipedge[export]'"
    # Whether the converter (or its checks) reads the calibration feeds at all.
    uses_feeds: bool = True
    # Whether its weights are int8 (their range, `Conversion.weight_bits`, is recorded).
    int8_weights: bool = True

    def graph_file(self, tower: str) -> str:
        return f"{tower}.{self.name}{self.suffix}"

    def method(self, requested: str) -> str | None:
        """The calibration method recorded in the manifest (None: no calibration data)."""
        if not self.needs_calibration:
            return None
        return self.fixed_method or requested

    def missing_modules(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


def _fp16(src: Path, feeds: Sequence[Feed], conversion: Conversion) -> Converter:
    from .fp16 import convert_to_fp16

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        return convert_to_fp16(src, dst, keep_fp32_nodes=keep_float)

    return convert


# Modules whose input activations one int8 scale cannot hold: the vision MLP's output
# projection (SwiGLU w3, after its sub-LayerNorm). Weight-only int8 there recovers most of the
# accuracy at int8 size; float weights would cost 42 % of fp32 for little more (figures:
# docs/benchmarks.md).
SENSITIVE_SCOPES = ("mlp.w3",)


def _sensitive_nodes(src: Path) -> list[str]:
    import onnx

    from .blocks import nodes_in_scope

    model = onnx.load(str(src), load_external_data=False)
    return [name for scope in SENSITIVE_SCOPES for name in nodes_in_scope(model, scope)]


def _int8_qdq(src: Path, feeds: Sequence[Feed], conversion: Conversion) -> Converter:
    from .int8_qdq import quantize_qdq
    from .onnx_variants import quantize_once

    sensitive = _sensitive_nodes(src)
    return quantize_once(
        src,
        lambda dst: quantize_qdq(
            src,
            dst,
            list(feeds),
            method=conversion.method,
            weight_only_nodes=sensitive,
            weight_bits=conversion.weight_bits,
        ),
    )


# The onnxruntime CPU form that measured fastest at cosine >= 0.99 (python -m benchmarks.cpu).
CPU_INT8_MODE = "dynamic"


def _int8_cpu(src: Path, feeds: Sequence[Feed], conversion: Conversion) -> Converter:
    from .cpu_int8 import quantize_cpu
    from .onnx_variants import quantize_once

    return quantize_once(
        src,
        lambda dst: quantize_cpu(
            src, dst, CPU_INT8_MODE, list(feeds), weight_bits=conversion.weight_bits
        ),
    )


def _int8_openvino(src: Path, feeds: Sequence[Feed], conversion: Conversion) -> Converter:
    import functools

    from .memory import budget_gb, stage, statistics_tokens
    from .openvino_int8 import attention_matmuls, quantize_all, save_ir, with_float_inputs
    from .report import graph_bytes

    # Attention stays bf16: int8 attention was no faster on the full-size image and less
    # accurate (docs/benchmarks.md, "The image tower at int8"). NNCF leaves it alone too:
    # its statistics on the attention maps were most of the calibration's memory.
    attention = attention_matmuls(src)

    max_tokens = statistics_tokens(graph_bytes(src), budget_gb())

    def quantize() -> Any:
        with stage("NNCF statistics and quantisation"):
            return quantize_all(
                src,
                feeds,
                float_layers=attention,
                max_tokens=max_tokens,
                weight_bits=conversion.weight_bits,
            )

    # NNCF runs once, on the first call; every variant the search asks for is derived from it.
    quantized = functools.cache(quantize)

    def convert(keep_float: Sequence[str], dst: Path) -> Path:
        # OpenVINO keeps ONNX node names as friendly names, so ONNX node lists apply as is.
        return save_ir(with_float_inputs(quantized(), [*attention, *keep_float]), dst)

    return convert


PRECISIONS = {
    "fp16": PrecisionSpec("fp16", "gpu", 0.999, False, _fp16, int8_weights=False),
    "int8": PrecisionSpec("int8", "gpu", 0.99, True, _int8_qdq),
    "int8-cpu": PrecisionSpec("int8-cpu", "cpu", 0.99, False, _int8_cpu, uses_feeds=False),
    "int8-ov": PrecisionSpec(
        "int8-ov",
        "openvino",
        0.99,
        True,
        _int8_openvino,
        suffix=".xml",
        requires=("nncf", "openvino"),
        fixed_method="nncf-transformer",
        install_hint="pip install 'clipedge[export,nncf]'",
    ),
}
CALIBRATION_METHODS = ("max", "entropy", "percentile")


def check_precisions(precisions: Sequence[str]) -> None:
    """Refuse an unknown precision, or one whose packages are missing, before any work."""
    from clipedge.errors import OptionError

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise OptionError(
            f"--precisions: unknown precision(s) {unknown}; choose from {sorted(PRECISIONS)}"
        )
    for precision in precisions:
        missing = PRECISIONS[precision].missing_modules()
        if missing:
            raise OptionError(
                f"precision {precision} needs {', '.join(missing)}: "
                f"{PRECISIONS[precision].install_hint}"
            )
