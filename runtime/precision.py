"""Which precision of a tower to run: the caller's choice, or the fastest that passed.

An export with calibration adds lower-precision graphs next to fp32, each with the device it
is meant for and whether it met its accuracy target. Preference is fastest first per device
class: on GPUs TensorRT/CUDA run Q/DQ int8 fastest, then fp16; on CPUs the onnxruntime int8
graph beats fp32 (figures in the README).
"""

from __future__ import annotations

import warnings

from .manifest import BundleError, GraphEntry

# OpenVINO reads the fp32 graph and runs it in bf16 (or f32) itself.
PREFERENCE = {
    "gpu": ("int8", "fp16", "fp32"),
    "cpu": ("int8-cpu", "fp32"),
    "openvino": ("fp32",),
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
