"""FP16 conversion of the tiny towers: fp32 I/O, accuracy, what stays fp32, overflow check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="calibration needs onnx (the export extra)")

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import clipedge
from clipedge.calibration import fp16, graph_io
from clipedge.calibration import tensor_stats as stats_module
from clipedge.calibration.data import CalibrationSet, tower_feeds
from clipedge.calibration.fp16 import (
    DEFAULT_FP32_OPS,
    convert_to_fp16,
    find_overflow,
    head_nodes,
)
from clipedge.calibration.graph_io import load_typed
from clipedge.calibration.report import cosine_stats, cpu_session, pooled_embeddings
from clipedge.calibration.tensor_stats import tensor_stats

from conftest import FIXTURE

skimage_data = pytest.importorskip("skimage.data", reason="real photographs for calibration")
PHOTOS = [
    Path(skimage_data.data_dir) / name
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg")
]
CAPTIONS = FIXTURE.parent / "calibration" / "captions.jsonl"
TOWERS = ("text", "vision")


@pytest.fixture(scope="module")
def feeds(tiny_bundle) -> dict[str, list[dict]]:
    calib = CalibrationSet.from_sources(images=PHOTOS, texts=CAPTIONS, limit=12)
    model = clipedge.load(tiny_bundle, backend="cpu")
    return {tower: tower_feeds(model, tower, calib, held_out=False) for tower in TOWERS}


@pytest.fixture(scope="module")
def converted(tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fp16")
    return {
        tower: convert_to_fp16(tiny_bundle / f"{tower}.onnx", out / f"{tower}.fp16.onnx")
        for tower in TOWERS
    }


def _types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    return types


@pytest.mark.parametrize("tower", TOWERS)
def test_fp16_graph_has_fp32_io_and_fp16_weights(converted, tiny_bundle, tower):
    session = ort.InferenceSession(str(converted[tower]), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(
        str(tiny_bundle / f"{tower}.onnx"), providers=["CPUExecutionProvider"]
    )
    io_types = lambda s: [(v.name, v.type) for v in [*s.get_inputs(), *s.get_outputs()]]  # noqa: E731
    assert io_types(session) == io_types(reference)
    model = onnx.load(str(converted[tower]))
    matmul_weights = {
        name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Conv")
        for name in node.input
    }
    weights = [t for t in model.graph.initializer if t.name in matmul_weights]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    fp32_bytes = (tiny_bundle / f"{tower}.onnx").stat().st_size
    assert converted[tower].stat().st_size < 0.6 * fp32_bytes


@pytest.mark.parametrize("tower", TOWERS)
def test_fp16_matches_fp32(converted, tiny_bundle, feeds, tower):
    reference = pooled_embeddings(cpu_session(tiny_bundle / f"{tower}.onnx"), tower, feeds[tower])
    candidate = pooled_embeddings(cpu_session(converted[tower]), tower, feeds[tower])
    assert candidate.dtype == np.float32
    assert cosine_stats(reference, candidate)["cosine_min"] >= 0.999


@pytest.mark.parametrize("tower", TOWERS)
def test_chosen_ops_and_pooling_head_stay_fp32(converted, tiny_bundle, tower):
    model = load_typed(converted[tower], with_data=False)
    types = _types(model)
    kept = [n for n in model.graph.node if n.op_type in DEFAULT_FP32_OPS]
    assert kept
    for node in kept:
        assert all(types[name] == TensorProto.FLOAT for name in [*node.input, *node.output])
    source = onnx.load(str(tiny_bundle / f"{tower}.onnx"), load_external_data=False)
    head = set(head_nodes(source))
    assert head
    by_name = {n.name: n for n in model.graph.node}
    for name in head:
        floats = [o for o in by_name[name].output if types[o] in stats_module.FLOAT_TYPES]
        assert all(types[o] == TensorProto.FLOAT for o in floats), name
    # Everything else that is float is fp16 (the graph really is converted).
    fp16_outputs = [
        o for n in model.graph.node for o in n.output if types.get(o) == TensorProto.FLOAT16
    ]
    assert len(fp16_outputs) > len(model.graph.node) / 2


@pytest.mark.parametrize("tower", TOWERS)
def test_graph_is_valid_sorted_and_has_no_cast_round_trips(converted, tower):
    model = onnx.load(str(converted[tower]))
    onnx.checker.check_model(model, full_check=True)
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        assert all(not name or name in available for name in node.input), node.name
        available.update(node.output)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if first is not None and first.op_type == "Cast":
            pytest.fail(f"Cast pair {first.name} -> {node.name} left in the graph")


def test_keep_fp32_nodes_keeps_those_nodes(tiny_bundle, tmp_path):
    src = tiny_bundle / "text.onnx"
    first_block = [n.name for n in onnx.load(str(src)).graph.node if "layers.0" in str(n)]
    fc = next(n for n in first_block if n.startswith("node_MatMul"))
    dst = convert_to_fp16(src, tmp_path / "t.onnx", keep_fp32_ops=(), keep_fp32_nodes=[fc])
    model = load_typed(dst, with_data=False)
    types = _types(model)
    node = next(n for n in model.graph.node if n.name == fc)
    assert all(types[name] == TensorProto.FLOAT for name in [*node.input, *node.output])
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert any(types[n.output[0]] == TensorProto.FLOAT16 for n in norms)


def test_find_overflow_is_clean_on_the_tiny_towers(converted, feeds):
    for tower in TOWERS:
        assert find_overflow(converted[tower], feeds[tower]) == []


def _scaling_graph(path: Path, factor: float) -> Path:
    """fp32 x -> fp16 -> x * factor * factor -> fp32: overflows fp16 for large x."""
    value = numpy_helper.from_array(np.array(factor, dtype=np.float16), "factor")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
            helper.make_node("Mul", ["x16", "factor"], ["scaled"]),
            helper.make_node("Mul", ["scaled", "factor"], ["scaled_twice"]),
            helper.make_node("Cast", ["scaled_twice"], ["y"], to=TensorProto.FLOAT),
        ],
        "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [value],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_find_overflow_reports_the_tensors_that_overflow_fp16(tmp_path):
    graph = _scaling_graph(tmp_path / "mul.onnx", 300.0)
    small = {"x": np.full((2, 4), 0.5, dtype=np.float32)}
    large = {"x": np.array([[0.5, 1.0, 2.0, 300.0]], dtype=np.float32)}
    assert find_overflow(graph, [small]) == []
    # 300 * 300 = 90000 > 65504 after the first Mul. The CPU runs both Muls in fp32 and
    # never stores inf, so the check compares with the declared fp16 range; `y` is fp32.
    assert find_overflow(graph, [small, large]) == ["scaled", "scaled_twice"]
    stats = tensor_stats(graph, [small, large])
    assert stats["x16"] == stats_module.TensorStats(finite=True, max_abs=300.0, limit=65504.0)
    assert stats["scaled"].max_abs == 90000.0 and stats["scaled"].overflows
    assert not stats["y"].overflows


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_find_overflow_reports_inf_and_nan(tmp_path, bad):
    graph = _scaling_graph(tmp_path / "mul.onnx", 2.0)
    clean = {"x": np.array([[0.0, 3.0, 1.0, -1.0]], dtype=np.float32)}
    feed = {"x": np.array([[bad, 3.0, 1.0, -1.0]], dtype=np.float32)}
    assert find_overflow(graph, [clean]) == []
    # The graph input is checked too: inf/NaN in the feeds shows up as such.
    assert find_overflow(graph, [clean, feed]) == ["x", "x16", "scaled", "scaled_twice", "y"]
    assert not tensor_stats(graph, [feed])["scaled"].finite


def test_tensor_stats_show_fp32_tensors_beyond_fp16_range(tmp_path):
    model = onnx.load(str(_scaling_graph(tmp_path / "mul.onnx", 300.0)))
    fp32 = graph_io.save_model(
        helper.make_model(
            helper.make_graph(
                [helper.make_node("Mul", ["x", "factor"], ["y"])],
                "fp32",
                list(model.graph.input),
                list(model.graph.output),
                [numpy_helper.from_array(np.array(300.0, dtype=np.float32), "factor")],
            ),
            opset_imports=[helper.make_opsetid("", 18)],
        ),
        tmp_path / "fp32.onnx",
    )
    stats = tensor_stats(fp32, [{"x": np.full((1, 4), 300.0, dtype=np.float32)}])
    assert stats["y"].max_abs == 90000.0 > stats_module.FP16_MAX
    assert not stats["y"].overflows  # fp32 holds it; the fp16 conversion would not


def test_large_graphs_are_saved_with_one_external_data_file(
    tiny_bundle, feeds, tmp_path, monkeypatch
):
    """Graphs over protobuf's limit (lowered here) keep weights in `<name>.data`; the
    overflow check reads them from beside the graph without copying."""
    monkeypatch.setattr(graph_io, "PROTOBUF_LIMIT", (64 << 20) + 1024)
    dst = convert_to_fp16(tiny_bundle / "text.onnx", tmp_path / "text.fp16.onnx")
    data = tmp_path / "text.fp16.onnx.data"
    assert data.is_file() and data.stat().st_size > dst.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.fp16.onnx", "text.fp16.onnx.data"]
    reference = pooled_embeddings(cpu_session(tiny_bundle / "text.onnx"), "text", feeds["text"])
    candidate = pooled_embeddings(cpu_session(dst), "text", feeds["text"])
    assert cosine_stats(reference, candidate)["cosine_min"] >= 0.999
    assert find_overflow(dst, feeds["text"][:1]) == []


def test_repeated_casts_are_dropped():
    """The shape onnxruntime < 1.32's converter leaves: one identical Cast per consumer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    cast = helper.make_node("Cast", ["x"], ["x_fp32"], to=TensorProto.FLOAT, name="x_cast")
    nodes = [
        cast,
        helper.make_node("Relu", ["x_fp32"], ["a"], name="a"),
        cast,
        helper.make_node("Add", ["a", "x_fp32"], ["y"], name="add"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)]
    )
    with pytest.raises(Exception, match="invalid model"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert fp16.drop_repeated_nodes(model) == 1
    assert [node.name for node in model.graph.node] == ["x_cast", "a", "add"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.array([-1.0, 2.0], np.float16)})[0]
    np.testing.assert_array_equal(out, [-1.0, 4.0])
