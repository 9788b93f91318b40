"""onnxruntime's CPU form of the graphs: attention fused into MultiHeadAttention.

The portable graphs materialise [batch, heads, L, L] scores per layer; the fused forms run
onnxruntime's flash-attention kernel, whose memory is linear in L (the text tower's padding
mask folded into q and k). The text form's values are checked past 512 tokens against an
independent reference in test_long_text_reference.py; here: the structure of both forms,
equality with the portable graphs on padded batches and images, and the memory of one
8192-token text.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

CPU_FORM = "text.onnxruntime-cpu.onnx"


def _ops(path) -> dict[str, int]:
    onnx = pytest.importorskip("onnx", reason="reads the graph with onnx (the export extra)")
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_the_manifest_names_the_cpu_form_and_the_cpu_backend_loads_it(tiny_bundle):
    import clipedge
    from clipedge.bundle.manifest import read_manifest

    entry = read_manifest(tiny_bundle).towers["text"].graphs["fp32"]
    assert entry.onnxruntime_cpu_file == CPU_FORM
    assert entry.file_for("cpu") == CPU_FORM
    assert {entry.file_for(b) for b in ("cuda", "tensorrt", "openvino")} == {"text.onnx"}
    model = clipedge.load(tiny_bundle, backend="cpu")
    assert model.plan.towers["text"].graph.name == CPU_FORM


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_every_attention_is_fused_and_the_portable_graph_keeps_standard_ops(tiny_bundle, tower):
    portable = _ops(tiny_bundle / f"{tower}.onnx")
    fused = _ops(tiny_bundle / f"{tower}.onnxruntime-cpu.onnx")
    layers = portable["Softmax"]
    assert layers == 2  # the tiny checkpoint's layers per tower
    assert fused.get("com.microsoft:MultiHeadAttention") == layers
    assert "Softmax" not in fused
    assert not any(":" in op for op in portable)  # OpenVINO and TensorRT read every op


def test_fusing_is_idempotent(tiny_bundle):
    onnx = pytest.importorskip("onnx", reason="rewrites a graph with onnx (the export extra)")
    from clipedge.export.fused_attention import fuse_attention

    for tower in ("text", "vision"):
        model = onnx.load(str(tiny_bundle / f"{tower}.onnxruntime-cpu.onnx"))
        assert fuse_attention(model) == 0


def test_the_vision_cpu_form_equals_the_portable_graph(tiny_bundle):
    size = ort.InferenceSession(str(tiny_bundle / "vision.onnx")).get_inputs()[0].shape[-1]
    pixels = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    runs = [
        ort.InferenceSession(str(tiny_bundle / name), providers=["CPUExecutionProvider"]).run(
            None, {"pixel_values": pixels}
        )[0]
        for name in ("vision.onnx", "vision.onnxruntime-cpu.onnx")
    ]
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=2e-5)


@pytest.mark.parametrize("lengths", [[5], [40, 7, 1], [700, 300], [1500, 2]])
def test_the_cpu_form_equals_the_portable_graph_on_padded_batches(tiny_bundle, lengths):
    rng = np.random.default_rng(len(lengths))
    ids = np.ones((len(lengths), max(lengths)), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = [0, *rng.integers(4, 300, length - 1)][:length]
    feed = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    runs = [
        ort.InferenceSession(str(tiny_bundle / name), providers=["CPUExecutionProvider"]).run(
            None, feed
        )[0]
        for name in ("text.onnx", CPU_FORM)
    ]
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=2e-5)


MEASURE = """
import json, resource, sys
import numpy as np, onnxruntime as ort
options = ort.SessionOptions()
options.enable_cpu_mem_arena = False
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
ids = np.full((1, 8192), 7, np.int64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
"""


def test_an_8192_token_text_costs_memory_linear_in_its_length(tiny_bundle):
    """The portable graph holds 4 heads x 8192^2 float scores (1 GB, and the softmax as much
    again: +2.2 GB measured); the fused form stays under 0.3 GB."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tiny_bundle / CPU_FORM)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) < 0.3e9
