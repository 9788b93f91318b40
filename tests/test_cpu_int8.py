"""CPU int8 graphs from the tiny bundle: they run, keep accuracy and have the intended ops."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="calibration needs onnx (the export extra)")

import onnx
import onnxruntime as ort
from onnx import numpy_helper

import clipedge
from clipedge.calibration import cpu_int8, graph_io
from clipedge.calibration.cpu_int8 import quantize_cpu, weight_matmuls
from clipedge.calibration.data import image_feeds, text_feeds
from clipedge.calibration.feeds import RowFeedReader

from conftest import FIXTURE

# Measured on the tiny random model: min cosine 0.9978 (vision dynamic) to 0.9996 (text);
# qoperator also quantises MatMul outputs to uint8, which costs the most (vision 0.9937).
MIN_COSINE = 0.99
# x86 CPUs without VNNI/AMX add pairs of uint8 x int8 products in saturating int16: weights
# within +-64 keep every pair in range (255 * 64 * 2 = 32640), so all CPUs compute the same.
PAIR_SAFE_WEIGHT = 64


@pytest.fixture(scope="module")
def feeds(tiny_bundle, reference) -> dict[str, list[dict[str, np.ndarray]]]:
    model = clipedge.load(tiny_bundle, backend="cpu")
    images = sorted((FIXTURE / "expected" / "inputs").glob("img*"))
    return {
        "text": list(text_feeds(model, reference["texts"])),
        "vision": list(image_feeds(model, images)),
    }


def _run(graph: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def _ops(graph: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(graph)).graph.node)


def _weights(graph: Path) -> set[str]:
    return {t.name for t in onnx.load(str(graph), load_external_data=False).graph.initializer}


@pytest.fixture(scope="module")
def quantized(tiny_bundle, feeds, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("int8")
    return {
        (mode, tower): quantize_cpu(
            tiny_bundle / f"{tower}.onnx", out / mode / f"{tower}.onnx", mode, feeds[tower]
        )
        for mode in cpu_int8.MODES
        for tower in ("text", "vision")
    }


@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("mode", cpu_int8.MODES)
def test_int8_keeps_cosine(tiny_bundle, feeds, quantized, mode, tower):
    reference = _run(tiny_bundle / f"{tower}.onnx", feeds[tower])
    output = _run(quantized[mode, tower], feeds[tower])
    assert output.shape == reference.shape
    assert _min_cosine(output, reference) >= MIN_COSINE


@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("mode", cpu_int8.MODES)
def test_int8_weights_cannot_saturate_int16_on_any_cpu(tiny_bundle, quantized, mode, tower):
    """The cosine tests catch int16 saturation only on the CPUs where it happens (AVX2, or
    AVX-512 without VNNI): with full 8-bit weights the vision tower passed on an AMX Xeon
    (0.9985, exact int32 sums) and failed on an AVX2 EPYC (0.9507). The weight bound that
    rules it out is machine-independent, so it is checked everywhere."""
    model = onnx.load(str(quantized[mode, tower]))
    weights = [
        numpy_helper.to_array(t).astype(np.int32)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
    ]
    assert len(weights) == len(weight_matmuls(tiny_bundle / f"{tower}.onnx"))
    assert max(np.abs(w).max() for w in weights) <= PAIR_SAFE_WEIGHT


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_dynamic_quantises_every_weight_matmul(tiny_bundle, quantized, tower):
    weights = weight_matmuls(tiny_bundle / f"{tower}.onnx")
    ops = _ops(quantized["dynamic", tower])
    assert weights and ops["MatMulInteger"] == len(weights)
    assert ops["DynamicQuantizeLinear"] == len(weights)
    # The attention MatMuls (and the text pooling MatMul) stay float.
    assert ops["MatMul"] == _ops(tiny_bundle / f"{tower}.onnx")["MatMul"] - len(weights)


def test_dynamic_stores_word_embeddings_int8(quantized):
    model = onnx.load(str(quantized["dynamic", "text"]))
    initializers = {init.name: init for init in model.graph.initializer}
    gather = next(
        n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in initializers
    )
    # onnxruntime stores a Gather table with the activation type: uint8 plus a zero point.
    assert initializers[gather.input[0]].data_type == onnx.TensorProto.UINT8
    consumers = [n.op_type for n in model.graph.node if gather.output[0] in n.input]
    assert consumers == ["DequantizeLinear"]


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_qdq_u8_quantises_weight_matmul_inputs_only(tiny_bundle, quantized, tower):
    model = onnx.load(str(quantized["qdq_u8", tower]))
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = set(weight_matmuls(tiny_bundle / f"{tower}.onnx"))
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            zero_point = next(i for i in model.graph.initializer if i.name == node.input[2])
            assert zero_point.data_type == onnx.TensorProto.UINT8  # u8 activations
        if node.op_type == "MatMul":
            fed = [producers[i].op_type if i in producers else "input" for i in node.input]
            quantised = fed == ["DequantizeLinear", "DequantizeLinear"]
            assert quantised == (node.name in weights), (node.name, fed)
    assert (
        _ops(quantized["qdq_u8", tower])["Softmax"]
        == _ops(tiny_bundle / f"{tower}.onnx")["Softmax"]
    )


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_qoperator_writes_qlinear_matmuls(tiny_bundle, quantized, tower):
    weights = weight_matmuls(tiny_bundle / f"{tower}.onnx")
    ops = _ops(quantized["qoperator", tower])
    assert ops["QLinearMatMul"] == len(weights)
    assert "QLinearSoftmax" not in ops


@pytest.mark.parametrize("mode", cpu_int8.MODES)
def test_excluded_nodes_stay_float(tiny_bundle, feeds, tmp_path, mode):
    src = tiny_bundle / "vision.onnx"
    keep = weight_matmuls(src)[:2]
    dst = quantize_cpu(src, tmp_path / "vision.onnx", mode, feeds["vision"], exclude_nodes=keep)
    model = onnx.load(str(dst))
    nodes = {node.name: node for node in model.graph.node}
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for name in keep:
        assert nodes[name].op_type == "MatMul" and nodes[name].input[1] in floats
    assert _min_cosine(_run(dst, feeds["vision"]), _run(src, feeds["vision"])) >= MIN_COSINE


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_search_variants_are_derived_from_one_conversion(
    tiny_bundle, feeds, tmp_path, monkeypatch, tower
):
    """The int8-cpu converter quantises once; a variant with nodes float equals converting
    again with those nodes excluded (bit for bit), whether one block or all but one."""
    from clipedge.calibration.blocks import nodes_by_block
    from clipedge.calibration.precisions import PRECISIONS, Conversion

    runs = []
    monkeypatch.setattr(
        cpu_int8, "quantize_cpu", lambda *a, **k: runs.append(a) or quantize_cpu(*a, **k)
    )
    src = tiny_bundle / f"{tower}.onnx"
    model = onnx.load(str(src))
    blocks = nodes_by_block(model)
    first, *rest = blocks.values()
    everything_but_first = [n.name for n in model.graph.node if n.name not in set(first)]
    convert = PRECISIONS["int8-cpu"].make_converter(src, feeds[tower], Conversion())
    convert([], tmp_path / "whole.onnx")
    for label, keep in (("one", first), ("all-but-one", everything_but_first)):
        derived = convert(keep, tmp_path / f"{label}-derived.onnx")
        direct = quantize_cpu(src, tmp_path / f"{label}-direct.onnx", "dynamic", exclude_nodes=keep)
        onnx.checker.check_model(str(derived))  # nodes in topological order, every input known
        assert _ops(derived) == _ops(direct)
        assert _weights(derived) == _weights(direct)  # no dead quantisers or float weights
        np.testing.assert_array_equal(_run(derived, feeds[tower]), _run(direct, feeds[tower]))
    assert len(runs) == 1, "one onnxruntime conversion for every variant"
    # A variant over protobuf's 2 GB (the full-size text tower's) keeps its weights apart.
    monkeypatch.setattr(graph_io, "PROTOBUF_LIMIT", 0)
    large = convert(first, tmp_path / "large.onnx")
    assert (tmp_path / "large.onnx.data").stat().st_size > large.stat().st_size
    np.testing.assert_array_equal(
        _run(large, feeds[tower]), _run(tmp_path / "one-derived.onnx", feeds[tower])
    )
    with pytest.raises(ValueError, match="not in the float graph"):
        convert(["no-such-node"], tmp_path / "bad.onnx")


@pytest.mark.parametrize("large", [False, True])
def test_two_passes_write_the_graph_of_one_pass(tiny_bundle, tmp_path, monkeypatch, large):
    """The MatMul pass runs with the Gather tables set aside as inputs (memory); the graph
    must be the one a single pass over both op types writes, weight for weight."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = tiny_bundle / "text.onnx"
    if large:  # weights in an external data file, as the full-size text tower's
        monkeypatch.setattr(graph_io, "PROTOBUF_LIMIT", 0)
        (tmp_path / "src").mkdir()
        onnx.save_model(
            onnx.load(str(src)), str(tmp_path / "src" / "text.onnx"), save_as_external_data=True
        )
        src = tmp_path / "src" / "text.onnx"
    two = quantize_cpu(src, tmp_path / "two" / "text.onnx", "dynamic", weight_bits=8)
    (tmp_path / "one").mkdir()
    quantize_dynamic(
        src,
        tmp_path / "one" / "text.onnx",
        op_types_to_quantize=["MatMul", "Gather"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    one, two = onnx.load(str(tmp_path / "one" / "text.onnx")), onnx.load(str(two))
    assert sorted(n.op_type for n in two.graph.node) == sorted(n.op_type for n in one.graph.node)
    assert [i.name for i in two.graph.input] == [i.name for i in one.graph.input]
    weights = {t.name: numpy_helper.to_array(t) for t in one.graph.initializer}
    assert {t.name for t in two.graph.initializer} == set(weights)
    for tensor in two.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])


def test_large_graphs_keep_weights_external(tiny_bundle, tmp_path, monkeypatch):
    # The full-size text tower (2.2 GB) cannot be one protobuf: pretend the tiny one is large.
    monkeypatch.setattr(graph_io, "PROTOBUF_LIMIT", 0)
    dst = quantize_cpu(tiny_bundle / "text.onnx", tmp_path / "text.onnx", "dynamic")
    assert (tmp_path / "text.onnx.data").stat().st_size > dst.stat().st_size
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    # the two passes (MatMuls, then the Gather) leave only the graph and its weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.onnx", "text.onnx.data"]


def test_quantising_keeps_onnxruntime_preprocessing_advice_out_of_the_log(
    tiny_bundle, tmp_path, caplog
):
    """The converters skip `quant_pre_process` on purpose (it may rename the nodes the block
    search names); its advice is dropped, other root-logger warnings are not."""
    import logging

    from clipedge.calibration.ort_advice import without_preprocessing_advice

    with caplog.at_level(logging.WARNING):
        quantize_cpu(tiny_bundle / "text.onnx", tmp_path / "text.onnx", "dynamic")
        with without_preprocessing_advice():
            logging.warning("something else")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["something else"]


def test_bad_arguments(tiny_bundle, tmp_path):
    src = tiny_bundle / "text.onnx"
    with pytest.raises(ValueError, match="unknown mode 'int4'"):
        quantize_cpu(src, tmp_path / "a.onnx", "int4")
    with pytest.raises(ValueError, match="needs calibration feeds"):
        quantize_cpu(src, tmp_path / "a.onnx", "qdq_u8")
    with pytest.raises(ValueError, match="must differ from src"):
        quantize_cpu(src, src, "dynamic")


needs_nncf = pytest.mark.skipif(
    importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None,
    reason="OpenVINO int8 needs the optional openvino and nncf packages",
)


@needs_nncf
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_openvino_int8_keeps_cosine_and_float_attention(tiny_bundle, feeds, tmp_path, tower):
    import openvino as ov

    from clipedge.calibration.openvino_int8 import attention_matmuls
    from clipedge.calibration.precisions import PRECISIONS, Conversion
    from clipedge.engine.openvino_backend import OpenVinoOptions, OpenVinoSession

    src = tiny_bundle / f"{tower}.onnx"
    attention = attention_matmuls(src)
    # Two attention MatMuls per layer (tiny: 2 layers), plus the text tower's pooling MatMul.
    assert len(attention) == (5 if tower == "text" else 4)
    convert = PRECISIONS["int8-ov"].make_converter(src, feeds[tower], Conversion())
    dst = convert([], tmp_path / f"{tower}.xml")
    model = ov.Core().read_model(str(dst))
    quantised = {
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul"
        and op.input_value(0).get_node().get_type_name() == "FakeQuantize"
    }
    assert quantised and not quantised & set(attention)
    # Every weight in half the int8 range (NNCF's overflow fix): see PAIR_SAFE_WEIGHT.
    weights = [
        _weight(op).get_data().astype(np.int32)
        for op in model.get_ops()
        if op.get_type_name() == "MatMul" and op.get_friendly_name() not in set(attention)
    ]
    assert weights and max(np.abs(w).max() for w in weights) <= PAIR_SAFE_WEIGHT
    session = OpenVinoSession(dst, OpenVinoOptions(inference_precision="f32"))
    output = np.concatenate([session.run(feed) for feed in feeds[tower]])
    assert _min_cosine(output, _run(src, feeds[tower])) >= MIN_COSINE


def test_calibration_reader_yields_single_rows_in_ranges():
    feeds = [{"x": np.arange(6).reshape(3, 2)}, {"x": np.arange(4).reshape(2, 2) + 10}]
    reader = RowFeedReader(feeds)
    assert len(reader) == 5
    rows = [reader.get_next() for _ in range(5)]
    assert all(row["x"].shape == (1, 2) for row in rows) and reader.get_next() is None
    np.testing.assert_array_equal(np.concatenate([r["x"] for r in rows[3:]]), feeds[1]["x"])
    reader.set_range(start_index=1, end_index=3)
    assert [reader.get_next()["x"][0, 0] for _ in range(2)] == [2, 4]
    assert reader.get_next() is None


@needs_nncf
def test_openvino_converter_keeps_the_named_onnx_nodes_float(
    tiny_bundle, feeds, tmp_path, monkeypatch
):
    """The block search names ONNX nodes; OpenVINO must honour them (its friendly names).
    NNCF runs once per converter; every variant is derived from that one quantised model;
    the float nodes get their float weights back, the others keep int8 weights."""
    import openvino as ov

    from clipedge.calibration import openvino_int8
    from clipedge.calibration.blocks import nodes_by_block
    from clipedge.calibration.openvino_int8 import attention_matmuls
    from clipedge.calibration.precisions import PRECISIONS, Conversion

    runs = []
    quantize_all = openvino_int8.quantize_all
    monkeypatch.setattr(
        openvino_int8, "quantize_all", lambda *a, **k: runs.append(a) or quantize_all(*a, **k)
    )
    src = tiny_bundle / "vision.onnx"
    blocks = nodes_by_block(onnx.load(str(src)))
    attention = set(attention_matmuls(src))
    convert = PRECISIONS["int8-ov"].make_converter(src, feeds["vision"], Conversion())
    for name, block in blocks.items():
        model = ov.Core().read_model(str(convert(block, tmp_path / f"{name}.xml")))
        matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
        fake_quantized = {
            op.get_friendly_name()
            for op in matmuls
            if op.input_value(0).get_node().get_type_name() == "FakeQuantize"
        }
        assert fake_quantized, "the other block is int8"
        assert not fake_quantized & set(block)
        assert fake_quantized & {n for other, ns in blocks.items() if other != name for n in ns}
        weights = set(block) - attention
        assert {_weight_type(op) for op in matmuls if op.get_friendly_name() in weights} == {"f32"}
        others = {op.get_friendly_name() for op in matmuls} - set(block) - attention
        assert {_weight_type(op) for op in matmuls if op.get_friendly_name() in others} == {"i8"}
    assert len(runs) == 1, "one NNCF run for every variant"


def _weight(op):
    """A MatMul's weight Constant, through its de-compression (Convert, Multiply)."""
    node = op.input_value(1).get_node()
    while node.get_type_name() != "Constant" and node.inputs():
        node = node.input_value(0).get_node()
    return node


def _weight_type(op) -> str:
    return _weight(op).get_element_type().get_type_name()
