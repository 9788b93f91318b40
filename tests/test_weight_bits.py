"""int8 weights in 7 or 8 bits: 8 where the CPU adds int8 products in int32, recorded in the
manifest, and never loaded on a CPU that would saturate them."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import clipedge
from clipedge.bundle.manifest import Accuracy, GraphEntry
from clipedge.engine import cpu_features
from clipedge.engine.plan import choose_precision

CAPTIONS = Path(__file__).parent / "fixtures" / "calibration" / "captions.jsonl"


@pytest.fixture()
def exact(monkeypatch):
    """Set whether "this CPU" adds int8 products in int32."""

    def set_exact(value: bool) -> None:
        monkeypatch.setattr(cpu_features, "int8_products_exact", lambda *a: value)

    return set_exact


@pytest.mark.parametrize(
    ("machine", "flags", "want"),
    [
        ("x86_64", "fpu sse avx2 avx512f avx512bw", False),  # AVX-512 without VNNI
        ("x86_64", "fpu sse avx2 avx_vnni", True),
        ("x86_64", "fpu avx512f avx512_vnni", True),
        ("x86_64", "fpu avx512f amx_int8 amx_tile", True),
        ("x86_64", None, False),  # flags unreadable: the safe side
        ("aarch64", None, True),
    ],
)
def test_which_cpus_add_int8_products_exactly(tmp_path, monkeypatch, machine, flags, want):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    cpu_features.int8_products_exact.cache_clear()
    try:
        assert cpu_features.int8_products_exact(cpuinfo) is want
    finally:
        cpu_features.int8_products_exact.cache_clear()


def _graphs(bits: int | None) -> dict[str, GraphEntry]:
    accuracy = Accuracy(cosine_min=0.995, cosine_mean=0.998, target=0.99, passed=True)
    return {
        "fp32": GraphEntry("text.onnx", "fp32"),
        "int8-cpu": GraphEntry("text.int8-cpu.onnx", "int8-cpu", "cpu", accuracy, None, bits),
        "int8": GraphEntry("text.int8.onnx", "int8", "gpu", accuracy, None, bits),
    }


def test_eight_bit_graphs_load_only_where_exact(exact, caplog):
    exact(False)
    with caplog.at_level(logging.WARNING):
        assert choose_precision("text", _graphs(8), "cpu") == "fp32"
    assert "8-bit int8 weights are not exact on this CPU" in caplog.text
    with pytest.raises(clipedge.BundleError, match="--weight-bits 7"):
        choose_precision("text", _graphs(8), "cpu", "int8-cpu")
    assert choose_precision("text", _graphs(8), "gpu") == "int8"  # GPUs sum in int32
    assert choose_precision("text", _graphs(7), "cpu") == "int8-cpu"
    assert choose_precision("text", _graphs(None), "cpu") == "int8-cpu"  # older bundles: 7
    exact(True)
    assert choose_precision("text", _graphs(8), "cpu", "int8-cpu") == "int8-cpu"


def test_a_malformed_weight_bits_is_refused(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    manifest["towers"]["text"]["graphs"]["fp32"]["weight_bits"] = 9
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    with pytest.raises(clipedge.BundleError, match="weight_bits must be 7 or 8, got 9"):
        clipedge.load(bundle, backend="cpu")


needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None, reason="calibration needs the export extra"
)
needs_nncf = pytest.mark.skipif(
    importlib.util.find_spec("nncf") is None or importlib.util.find_spec("openvino") is None,
    reason="OpenVINO int8 needs the optional openvino and nncf packages",
)


def _calibrate(bundle: Path, precision: str, bits: str) -> int:
    from clipedge.cli import main

    argv = ["calibrate", str(bundle), "--towers", "text", "--precisions", precision]
    argv += ["--calibration-texts", str(CAPTIONS), "--no-search", "--weight-bits", bits]
    return main(argv)


def _onnx_int8_weights(graph: Path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    return max(
        int(np.abs(numpy_helper.to_array(t).astype(np.int32)).max())
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    )


def _feeds_a_matmul(op, steps: int = 4) -> bool:
    """Whether an int8 constant reaches a MatMul through its dequantising ops (the word
    embedding table reaches a Gather: no products to saturate, NNCF keeps it 8-bit)."""
    for _ in range(steps):
        consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
        if not consumers:
            return False
        op = consumers[0]
        if op.get_type_name() == "MatMul":
            return True
    return False


def _openvino_int8_weights(graph: Path) -> int:
    import openvino as ov

    model = ov.Core().read_model(str(graph))
    return max(
        int(np.abs(op.get_data().astype(np.int32)).max())
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_element_type() == ov.Type.i8
        and _feeds_a_matmul(op)
    )


@pytest.mark.parametrize(
    ("precision", "largest"),
    [
        pytest.param("int8-cpu", _onnx_int8_weights, marks=needs_onnx),
        pytest.param("int8-ov", _openvino_int8_weights, marks=[needs_onnx, needs_nncf]),
    ],
)
def test_calibrate_writes_and_records_the_weight_range(
    tiny_bundle, tmp_path, exact, precision, largest
):
    exact(True)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    suffix = ".xml" if precision == "int8-ov" else ".onnx"
    graph = bundle / f"text.{precision}{suffix}"
    found = {}
    for bits in ("7", "8"):
        assert _calibrate(bundle, precision, bits) == 0
        manifest = json.loads((bundle / "clipedge.json").read_text())
        found[bits] = manifest["towers"]["text"]["graphs"][precision]["weight_bits"]
        found[bits, "largest"] = largest(graph)
    assert found["7"] == 7 and found["7", "largest"] <= 64  # no pair of products saturates
    assert found["8"] == 8 and found["8", "largest"] > 64


@needs_onnx
def test_eight_bits_are_refused_where_the_gate_would_saturate(tiny_bundle, exact, capsys):
    exact(False)
    assert _calibrate(tiny_bundle, "int8-cpu", "8") == 2
    assert "--weight-bits 8: this CPU (x86 without VNNI or AMX)" in capsys.readouterr().err


@needs_onnx
def test_auto_follows_the_cpu_and_the_runtime_checks_it(tiny_bundle, tmp_path, exact):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    exact(True)
    assert _calibrate(bundle, "int8-cpu", "auto") == 0
    manifest = json.loads((bundle / "clipedge.json").read_text())
    assert manifest["towers"]["text"]["graphs"]["int8-cpu"]["weight_bits"] == 8
    assert clipedge.load(bundle, backend="cpu").precisions["text"] == "int8-cpu"
    exact(False)  # the same bundle on a CPU without VNNI/AMX
    assert clipedge.load(bundle, backend="cpu").precisions["text"] == "fp32"
    with pytest.raises(clipedge.BundleError, match="adds int8 products in a saturating int16"):
        clipedge.load(bundle, backend="cpu", precision="int8-cpu")
