"""The TensorRT-readiness check: passes the exported graphs, catches what blocks a build."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="export tests need the [export] extra")

import onnx
from onnx import TensorProto, helper

from clipedge.export.graph_check import check_graph  # noqa: E402


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_exported_graphs_pass(tiny_bundle, tiny_token_states_bundle, tower):
    for bundle in (tiny_bundle, tiny_token_states_bundle):
        model = onnx.load(str(bundle / f"{tower}.onnx"))
        report = check_graph(model)
        assert report.ok, report.problems
        assert model.opset_import[0].version >= 18
        assert report.op_histogram["MatMul"] > 0
        # The lean-graph promises: no boolean masking, no control flow.
        for op in ("Where", "IsNaN", "If", "Loop", "Not", "Equal"):
            assert op not in report.op_histogram, op


def test_exported_graph_has_dynamic_axes(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "text.onnx"))
    for tensor in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]
        assert all(isinstance(d, str) for d in dims), (tensor.name, dims)


def _model(node: onnx.NodeProto, **kwargs) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", [x], [y], **kwargs))


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (helper.make_node("NonZero", ["x"], ["y"]), "data-dependent"),
        (helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft"), "custom domain"),
        (helper.make_node("Hardmax", ["x"], ["y"]), "not in TensorRT"),
        (helper.make_node("Unsqueeze", ["x", "x"], ["y"]), "must be a constant"),
    ],
)
def test_blocking_constructs_are_reported(node, reason):
    report = check_graph(_model(node))
    assert not report.ok
    assert any(reason in problem for problem in report.problems)
