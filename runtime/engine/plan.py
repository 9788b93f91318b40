"""Which precision of a tower to run: the caller's choice, or the fastest that passed.

An export with calibration adds lower-precision graphs next to fp32, each with the device it
is meant for and whether it met its accuracy target. Preference is fastest first per device
class: on GPUs TensorRT/CUDA run Q/DQ int8 fastest, then fp16; on CPUs the onnxruntime int8
graph beats fp32, and under OpenVINO its own NNCF int8 IR beats everything (figures in the
README).
"""

from __future__ import annotations

import warnings

from ..bundle.manifest import BundleError, GraphEntry

# OpenVINO runs its int8 IR, or reads the fp32 ONNX graph and runs it in bf16 (or f32).
PREFERENCE = {
    "gpu": ("int8", "fp16", "fp32"),
    "cpu": ("int8-cpu", "fp32"),
    "openvino": ("int8-ov", "fp32"),
}


def choose_precision(
    tower: str, graphs: dict[str, GraphEntry], device: str, requested: str | None = None
) -> str:
    """The precision to load for `tower` on `device` ("cpu" or "gpu")."""
    if requested is not None:
        if requested not in graphs:
            raise BundleError(
                f"bundle has no {requested} {tower} graph (available: {', '.join(graphs)})"
            )
        entry = graphs[requested]
        if entry.device == "openvino" and device != "openvino":  # OpenVINO IR, not ONNX
            raise BundleError(
                f"the {tower} {requested} graph ({entry.file}) runs only with backend='openvino'"
            )
        if not entry.passed:
            warnings.warn(
                f"{tower} {requested} graph missed its accuracy target at export "
                f"({entry.accuracy}); results may drift from fp32",
                RuntimeWarning,
                stacklevel=3,
            )
        if entry.device not in ("any", device):
            warnings.warn(
                f"{tower} {requested} graph is meant for {entry.device}, running on {device}",
                RuntimeWarning,
                stacklevel=3,
            )
        return requested
    for precision in PREFERENCE[device]:
        entry = graphs.get(precision)
        if entry is not None and entry.passed and entry.device in ("any", device):
            return precision
    raise BundleError(f"bundle has no {tower} graph usable on {device} (has: {', '.join(graphs)})")


def prefers_openvino(towers_graphs: list[dict[str, GraphEntry]]) -> bool:
    """True when every tower has a passing OpenVINO int8 graph: then, on a machine without an
    NVIDIA GPU, OpenVINO is the fastest backend for this bundle (if it is installed)."""
    return bool(towers_graphs) and all(
        "int8-ov" in graphs and graphs["int8-ov"].passed for graphs in towers_graphs
    )
