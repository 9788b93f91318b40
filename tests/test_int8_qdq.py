"""INT8 Q/DQ graphs of the tiny towers: TensorRT's Q/DQ rules, accuracy, int8 embedding rows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="calibration needs onnx (the export extra)")

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, create_calibrator, load_tensors_data

import clipedge
from clipedge.calibration.data import CalibrationSet, tower_feeds
from clipedge.calibration.feeds import RowFeedReader
from clipedge.calibration.fp16 import head_nodes
from clipedge.calibration.int8_qdq import (
    attention_matmuls,
    quantize_embedding_rows,
    quantize_qdq,
    save_max_ranges,
)
from clipedge.calibration.report import cosine_stats, cpu_session, graph_bytes, pooled_embeddings

from conftest import FIXTURE

skimage_data = pytest.importorskip("skimage.data", reason="real photographs for calibration")
PHOTOS = [
    Path(skimage_data.data_dir) / name
    for name in (
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "camera.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "hubble_deep_field.jpg",
        "retina.jpg",
    )
]
CAPTIONS = FIXTURE.parent / "calibration" / "captions.jsonl"
TOWERS = ("text", "vision")
WEIGHTED = ("MatMul", "Conv")


@pytest.fixture(scope="module")
def feeds(tiny_bundle) -> dict[tuple[str, bool], list[dict]]:
    """(tower, held_out) -> feeds; calibration never sees the held-out part."""
    calib = CalibrationSet.from_sources(images=PHOTOS, texts=CAPTIONS, limit=24)
    model = clipedge.load(tiny_bundle, backend="cpu")
    return {
        (tower, held): tower_feeds(model, tower, calib, held_out=held)
        for tower in TOWERS
        for held in (False, True)
    }


@pytest.fixture(scope="module")
def quantized(tiny_bundle, feeds, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("qdq")
    return {
        tower: quantize_qdq(
            tiny_bundle / f"{tower}.onnx", out / f"{tower}.int8.onnx", feeds[tower, False]
        )
        for tower in TOWERS
    }


def _weight_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@pytest.mark.parametrize("tower", TOWERS)
def test_qdq_follows_tensorrt_rules(quantized, tiny_bundle, tower):
    model = onnx.load(str(quantized[tower]))
    nodes = list(model.graph.node)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in nodes for o in n.output}
    quantizers = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {n.op_type for n in quantizers} == {"QuantizeLinear", "DequantizeLinear"}
    for node in quantizers:  # symmetric int8: every zero point is an int8 zero
        zero_point = weights[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name

    fp32 = onnx.load(str(tiny_bundle / f"{tower}.onnx"))
    head, attention = set(head_nodes(fp32)), set(attention_matmuls(fp32))
    weighted = [n for n in nodes if n.op_type in WEIGHTED and n.name not in head | attention]
    assert weighted
    for node in weighted:  # every input of every weighted op comes through Q/DQ
        dequant = [producer.get(name) for name in node.input[:2]]
        assert all(d is not None and d.op_type == "DequantizeLinear" for d in dequant), node.name
        weight = next(d for d in dequant if d.input[0] in weights)
        values, scale = weights[weight.input[0]], weights[weight.input[1]]
        axis = _attr(weight, "axis")
        channel_axis = 0 if node.op_type == "Conv" else 1
        assert values.dtype == np.int8 and axis == channel_axis, node.name
        assert scale.shape == (values.shape[channel_axis],) and np.all(scale > 0)
        # 7-bit values (int8_qdq docstring): onnxruntime's int8 GEMMs stay exact on x86 CPUs
        # without VNNI, where the calibration gate may run.
        assert np.abs(values.astype(np.int32)).max() <= 64

    for node in nodes:
        if node.op_type in ("LayerNormalization", "Softmax", "Add"):  # float ops read float
            sources = [producer[name].op_type for name in node.input if name in producer]
            assert "DequantizeLinear" not in sources, node.name
        if node.op_type in WEIGHTED:  # outputs of weighted ops are not re-quantized
            readers = [n.op_type for n in nodes if node.output[0] in n.input]
            assert "QuantizeLinear" not in readers, node.name
    for name in head | attention:  # the pooling head and attention stay float
        node = next(n for n in nodes if n.name == name)
        assert all(
            producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input
        )


def test_attention_int8_puts_qdq_on_both_attention_inputs(tiny_bundle, feeds, tmp_path):
    src = tiny_bundle / "text.onnx"
    fp32 = onnx.load(str(src))
    attention = [n for n in attention_matmuls(fp32) if n not in head_nodes(fp32)]
    assert len(attention) == 4  # q.k^T and softmax.v in each of the 2 layers
    dst = quantize_qdq(src, tmp_path / "q.onnx", feeds["text", False], attention_int8=True)
    model = onnx.load(str(dst))
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.name in attention):
        assert [producer[i].op_type for i in node.input] == ["DequantizeLinear"] * 2


def test_long_text_keeps_cosine_with_float_attention(quantized, tiny_bundle, reference):
    """int8 softmax probabilities over 512 keys drifted to cosine 0.98975 (0.99996 float)."""
    model = clipedge.load(tiny_bundle, backend="cpu")
    long_text = max(reference["texts"], key=len)
    tower = model.tower("text")
    feeds = tower.feeds([tower.prepare([long_text]).row(0)])
    assert feeds["input_ids"].shape[1] == 512
    feed = [feeds]
    fp32 = pooled_embeddings(cpu_session(tiny_bundle / "text.onnx"), "text", feed)
    int8 = pooled_embeddings(cpu_session(quantized["text"]), "text", feed)
    assert cosine_stats(fp32, int8)["cosine_min"] >= 0.999


@pytest.mark.parametrize("method", ["max", "entropy", "percentile"])
@pytest.mark.parametrize("tower", TOWERS)
def test_qdq_matches_fp32_on_held_out_data(tiny_bundle, feeds, tmp_path, tower, method):
    src = tiny_bundle / f"{tower}.onnx"
    dst = quantize_qdq(src, tmp_path / "q.onnx", feeds[tower, False], method=method)
    held = feeds[tower, True]
    reference = pooled_embeddings(cpu_session(src), tower, held)
    candidate = pooled_embeddings(cpu_session(dst), tower, held)
    # Measured on this tiny random model: min cosine 0.9998 (text), 0.9982 (vision).
    assert cosine_stats(reference, candidate)["cosine_min"] >= 0.99


@pytest.mark.parametrize("tower", TOWERS)
def test_quantized_graphs_are_smaller_with_int8_weights(quantized, tiny_bundle, tower):
    model = onnx.load(str(quantized[tower]))
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    float_matrices = [
        t.name
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2 and t.name not in dequantized
    ]
    # Left float: positional tables (RoPE cos/sin, patch positions, the CLS token) and the
    # embedding's row scales only.
    allowed = ("rope", "pos", "cls", "_row_scale")
    assert all(any(a in n for a in allowed) for n in float_matrices), float_matrices
    # The tiny towers are dominated by those tables (text: the 8194-row RoPE tables); the
    # full-size towers measure 26-27% of fp32.
    limit = {"text": 0.8, "vision": 0.35}[tower]
    assert graph_bytes(quantized[tower]) < limit * graph_bytes(tiny_bundle / f"{tower}.onnx")


def test_embedding_rows_are_int8_with_row_scales(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "text.onnx"))
    table = numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "word_embeddings.weight")
    )
    quantize_embedding_rows(model)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "word_embeddings.weight" not in weights
    rows, scales = (
        weights["word_embeddings.weight_int8"],
        weights["word_embeddings.weight_row_scale"],
    )
    assert rows.dtype == np.int8 and rows.shape == table.shape
    assert scales.dtype == np.float32 and scales.shape == (table.shape[0], 1)
    lookup = [n for n in model.graph.node if n.name.startswith("node_embedding")]
    assert [n.op_type for n in lookup] == ["Gather", "Cast", "Gather", "Mul"]

    # The graph's own lookup, exposed as an output, against the fp32 rows.
    model.graph.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 316, 17, 2], [0, 250, 3, 2, 1]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    gathered = session.run(["embedding"], feed)
    error = np.abs(gathered[0] - table[ids])
    assert np.all(error <= scales[ids] / 2 * (1 + 1e-5))
    assert error.max() > 0  # it really was rounded


@pytest.mark.parametrize("tower", TOWERS)
def test_exclude_nodes_stay_float(tiny_bundle, feeds, tmp_path, tower):
    src = tiny_bundle / f"{tower}.onnx"
    fp32 = onnx.load(str(src))
    weights = {t.name for t in fp32.graph.initializer}
    weighted = [n for n in fp32.graph.node if n.op_type in WEIGHTED and weights & set(n.input)]
    excluded = {weighted[0].name, weighted[-1].name}
    if tower == "text":
        excluded.add("node_embedding")
    dst = quantize_qdq(src, tmp_path / "q.onnx", feeds[tower, False], exclude_nodes=excluded)
    model = onnx.load(str(dst))
    producer = {o: n for n in model.graph.node for o in n.output}
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    by_name = {n.name: n for n in model.graph.node}
    for name in excluded:
        node = by_name[name]
        assert all(
            i not in producer or producer[i].op_type != "DequantizeLinear" for i in node.input
        )
        assert floats & set(node.input), name  # its weight or table is still fp32
    # The rest is still quantized.
    assert any(
        producer[i].op_type == "DequantizeLinear"
        for n in weighted[1:-1]
        for i in by_name[n.name].input
        if i in producer
    )


@pytest.mark.parametrize("tower", TOWERS)
def test_search_variants_are_derived_from_one_calibration(
    tiny_bundle, feeds, tmp_path, monkeypatch, tower
):
    """The int8 converter calibrates once; a block kept float in a variant matches a fresh
    conversion with that block excluded, bit for bit (the rest reads the same ranges)."""
    from clipedge.calibration import int8_qdq
    from clipedge.calibration.blocks import nodes_by_block, nodes_in_scope
    from clipedge.calibration.precisions import PRECISIONS, SENSITIVE_SCOPES, Conversion

    runs = []
    monkeypatch.setattr(
        int8_qdq, "quantize_qdq", lambda *a, **k: runs.append(a) or quantize_qdq(*a, **k)
    )
    src = tiny_bundle / f"{tower}.onnx"
    calibration = feeds[tower, False]
    graph = onnx.load(str(src))
    block = next(iter(nodes_by_block(graph).values()))
    convert = PRECISIONS["int8"].make_converter(src, calibration, Conversion())
    convert([], tmp_path / "whole.onnx")
    derived = convert(block, tmp_path / "derived.onnx")
    direct = quantize_qdq(  # the module's function, not the counting one
        src,
        tmp_path / "direct.onnx",
        calibration,
        exclude_nodes=block,
        weight_only_nodes=[n for scope in SENSITIVE_SCOPES for n in nodes_in_scope(graph, scope)],
    )
    onnx.checker.check_model(str(derived))
    for read in (lambda g: Counter(n.op_type for n in g.graph.node), _weight_names):
        assert read(onnx.load(str(derived))) == read(onnx.load(str(direct)))
    held = feeds[tower, True]
    np.testing.assert_array_equal(
        pooled_embeddings(cpu_session(derived), tower, held),
        pooled_embeddings(cpu_session(direct), tower, held),
    )
    assert len(runs) == 1, "one calibration for the whole tower and every variant"


def test_feed_reader_yields_single_rows_and_honours_ranges():
    feeds = [
        {"x": np.arange(6, dtype=np.float32).reshape(3, 2)},
        {"x": np.arange(4, dtype=np.float32).reshape(2, 2)},
    ]
    reader = RowFeedReader(feeds)
    assert len(reader) == 5
    rows = list(iter(reader.get_next, None))
    assert [r["x"].shape for r in rows] == [(1, 2)] * 5
    reader.set_range(3, 5)
    assert [r["x"][0, 1] for r in iter(reader.get_next, None)] == [1.0, 3.0]


def test_unknown_method_is_refused(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_qdq(tiny_bundle / "vision.onnx", tmp_path / "q.onnx", [], method="kl")


def test_max_ranges_equal_onnxruntime_minmax_calibrator(tiny_bundle, feeds, tmp_path):
    """The memory-flat "max" calibration gives onnxruntime's MinMax ranges."""
    src = tiny_bundle / "vision.onnx"
    ours = load_tensors_data(save_max_ranges(src, feeds["vision", False], tmp_path / "r.json"))
    calibrator = create_calibrator(
        src,
        ["MatMul", "Conv"],
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"symmetric": True},
    )
    calibrator.collect_data(RowFeedReader(feeds["vision", False]))
    theirs = calibrator.compute_data()
    assert len(theirs.data) > 20
    for name, data in theirs.data.items():
        np.testing.assert_allclose(ours[name].range_value, data.range_value, rtol=1e-6)


def test_weight_only_nodes_keep_int8_weights_and_read_float(tiny_bundle, feeds, tmp_path):
    from clipedge.calibration.blocks import nodes_in_scope

    src = tiny_bundle / "vision.onnx"
    fp32 = onnx.load(str(src))
    w3 = [n.name for n in fp32.graph.node if n.op_type == "MatMul"]
    w3 = [name for name in w3 if name in set(nodes_in_scope(fp32, "mlp.w3"))]
    assert len(w3) == 2  # one per block
    dst = quantize_qdq(src, tmp_path / "q.onnx", feeds["vision", False], weight_only_nodes=w3)
    model = onnx.load(str(dst))
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.name in w3):
        assert producer[node.input[0]].op_type != "DequantizeLinear"  # float activation
        dequant = producer[node.input[1]]
        assert dequant.op_type == "DequantizeLinear"
        assert weights[dequant.input[0]].dtype == np.int8  # int8 weight, per channel
    read = {name for n in model.graph.node for name in n.input} | {"image_embeds"}
    assert all(any(o in read for o in n.output) for n in model.graph.node), "dead Q/DQ left"
    held = feeds["vision", True]
    reference = pooled_embeddings(cpu_session(src), "vision", held)
    candidate = pooled_embeddings(cpu_session(dst), "vision", held)
    assert cosine_stats(reference, candidate)["cosine_min"] >= 0.99
