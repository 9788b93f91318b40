"""The ONNX opsets an export may ask for, checked before anything is loaded.

torch.onnx's exporter (dynamo) writes its ops at opset 18 and converts the graph to the
requested opset afterwards. Below 18 that conversion fails or is skipped (opset 17: a vision
Split with `num_outputs`, which onnxruntime refuses; 16: the graph silently stays at 18);
above 25 the converter has no adapter for Gelu. 18 to 25 were exported and verified in
onnxruntime here (torch 2.13, onnxscript 0.7, onnx 1.23, onnxruntime 1.32). No torch import:
the command line checks `--opset` while it parses.
"""

from __future__ import annotations

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 25


def check_opset(opset: object) -> int:
    """The opset as an int in the supported range (capped by the newest the installed onnx has)."""
    import onnx

    highest = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {highest}, got {opset!r}")
    return opset
