"""Choosing a tower's precision from the bundle's graphs, the device and the caller's wish."""

from __future__ import annotations

import pytest

from clipedge.bundle.manifest import Accuracy, BundleError, GraphEntry
from clipedge.engine.plan import choose_precision, prefers_openvino

PASSED = Accuracy(cosine_min=0.999, cosine_mean=0.9995, target=0.99, passed=True)
FAILED = Accuracy(cosine_min=0.98, cosine_mean=0.985, target=0.99, passed=False)

GRAPHS = {
    "fp32": GraphEntry("text.onnx", "fp32"),
    "fp16": GraphEntry("text.fp16.onnx", "fp16", device="gpu", accuracy=PASSED),
    "int8": GraphEntry("text.int8.onnx", "int8", device="gpu", accuracy=FAILED),
    "int8-cpu": GraphEntry("t.i8c.onnx", "int8-cpu", device="cpu", accuracy=PASSED),
}


def test_default_is_fastest_passing_graph_for_the_device():
    assert choose_precision("text", GRAPHS, "cpu") == "int8-cpu"
    # int8 missed its target, so the GPU gets fp16.
    assert choose_precision("text", GRAPHS, "gpu") == "fp16"
    assert choose_precision("text", {"fp32": GRAPHS["fp32"]}, "gpu") == "fp32"


def test_requested_precision_is_honoured_with_warnings():
    with pytest.warns(RuntimeWarning, match="missed its accuracy target"):
        assert choose_precision("text", GRAPHS, "gpu", "int8") == "int8"
    with pytest.warns(RuntimeWarning, match="meant for gpu, running on cpu"):
        assert choose_precision("text", GRAPHS, "cpu", "fp16") == "fp16"


def test_missing_precision_lists_available():
    with pytest.raises(BundleError, match="no bf16 text graph.*fp32, fp16"):
        choose_precision("text", GRAPHS, "cpu", "bf16")


OV = {
    "fp32": GRAPHS["fp32"],
    "int8-cpu": GRAPHS["int8-cpu"],
    "int8-ov": GraphEntry("t.xml", "int8-ov", "openvino", PASSED),
}


def test_openvino_ir_graphs_only_go_to_openvino():
    assert choose_precision("text", OV, "openvino") == "int8-ov"
    assert choose_precision("text", OV, "cpu") == "int8-cpu"
    assert choose_precision("text", OV, "gpu") == "fp32"
    with pytest.raises(BundleError, match="runs only with backend='openvino'"):
        choose_precision("text", OV, "cpu", "int8-ov")


def test_openvino_is_preferred_only_when_every_tower_has_a_passing_int8_ov_graph():
    failed = {**OV, "int8-ov": GraphEntry("x.xml", "int8-ov", "openvino", FAILED)}
    assert prefers_openvino([OV, OV])
    assert not prefers_openvino([OV, GRAPHS])
    assert not prefers_openvino([OV, failed])
    assert not prefers_openvino([])
