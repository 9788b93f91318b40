"""The arithmetic floor of this CPU for each benchmark case: matrix work / peak matrix rate.

Why: the speed goals were set on a CPU with AMX; on another CPU the same graph has another
floor. This measures the peak rate of the GEMM kernels the fast
paths use, on this machine and thread count, and counts the multiply-adds of every
MatMul/Gemm/Conv of the bundle's graphs at each case's shapes, so a measured time can be read
as a fraction of what this machine can do at all.

- int8 peak: the faster of onnxruntime `MatMulInteger` (u8 x s8, the MLAS kernel behind
  dynamic int8) and OpenVINO's int8 FullyConnected (oneDNN). They differ: on a Xeon with AMX
  MLAS runs VNNI kernels and OpenVINO AMX ones (docs/benchmarks.md).
- also reported: OpenVINO's bf16 kernel (the rate of the parts kept in bf16), fp32 MatMul.
- a second floor counts attention as the kernel that runs it rather than as matrix work:
  weight products at the int8 peak plus, per layer, OpenVINO's fused attention (both
  products and the softmax, bf16) timed alone at the case's shapes. The matrix-only floor
  leaves out the softmax's exponentials, which no int8 kernel removes (24 x 16 x 1297^2 of
  them in the image tower); this one says what the kernels need, so the rest of a measured
  time is the glue between them (norms, activations, layout).

    .venv/bin/python -m benchmarks.floor --bundle /tmp/clipedge-bench/work/bundle \
        --out /tmp/clipedge-bench/floor.json [--measured /tmp/clipedge-bench/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .common import write_json
from .machine import machine_info

CASES = {  # case -> (tower, input shapes)
    "image_1x512px": ("vision", {"pixel_values": [1, 3, 512, 512]}),
    "text_8x32": ("text", {"input_ids": [8, 32], "attention_mask": [8, 32]}),
    "text_1x512": ("text", {"input_ids": [1, 512], "attention_mask": [1, 512]}),
}
GEMM_SIZE = 2048


def _gemm_model(kind: str, n: int) -> bytes:
    """A graph of one n x n x n product: MatMulInteger (u8 x s8) or fp32 MatMul."""
    if kind == "int8":
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "gemm", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def peak_ops_per_s(kind: str, threads: int, n: int = GEMM_SIZE, runs: int = 10) -> float:
    """Best-of-`runs` multiply-add rate x 2 (ops/s) of one n^3 product."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        _gemm_model(kind, n), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    if kind == "int8":
        feeds = {
            "a": rng.integers(0, 255, (n, n), dtype=np.uint8),
            "b": rng.integers(-127, 127, (n, n), dtype=np.int8),
        }
    else:
        feeds = {name: rng.standard_normal((n, n), dtype=np.float32) for name in ("a", "b")}
    session.run(None, feeds)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def openvino_peak_ops_per_s(
    kind: str, threads: int, n: int = GEMM_SIZE, runs: int = 10
) -> float | None:
    """Best-of-`runs` rate of OpenVINO's own GEMM kernel (oneDNN: AMX where the CPU has it,
    which MLAS may not use) for an n^3 product: int8 (u8 activations through a FakeQuantize,
    int8 weights) or bf16. Kernel time from OpenVINO's profile, the quantise step left out.
    None without OpenVINO."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], np.float32, name="x")
    weight = rng.integers(-127, 127, (n, n)).astype(np.int8)
    if kind == "int8":
        one = np.float32(1)
        quantized = ops.fake_quantize(x, -one, one, -one, one, 256)
        scale = ops.constant(np.full((n, 1), 0.01, np.float32))
        dequantized = ops.multiply(ops.convert(ops.constant(weight), np.float32), scale)
        product = ops.matmul(quantized, dequantized, False, True)
    else:
        product = ops.matmul(x, ops.constant(weight.astype(np.float32) * 0.01), False, True)
    config = {
        "INFERENCE_NUM_THREADS": str(threads),
        "INFERENCE_PRECISION_HINT": "bf16" if kind == "bf16" else "f32",
        "PERF_COUNT": "YES",
    }
    compiled = ov.Core().compile_model(ov.Model([product], [x]), "CPU", config)
    request = compiled.create_infer_request()
    feed = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    request.infer({0: feed})
    best = float("inf")
    for _ in range(runs):
        request.infer({0: feed})
        kernel = sum(
            info.real_time.total_seconds()
            for info in request.profiling_info
            if info.node_type in ("FullyConnected", "MatMul")
        )
        best = min(best, kernel)
    return 2 * n**3 / best


def openvino_attention_s(shape: list[int], threads: int, runs: int = 10) -> float | None:
    """Best-of-`runs` kernel seconds of OpenVINO's fused attention, softmax(q k^T / sqrt(d)) v
    with q, k, v of `shape` [batch, heads, tokens, head_dim], in bf16 (how every int8 graph
    here runs attention). None without OpenVINO."""
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    q, k, v = (ops.parameter(shape, np.float32, name=name) for name in "qkv")
    scores = ops.multiply(ops.matmul(q, k, False, True), np.float32(shape[-1] ** -0.5))
    context = ops.matmul(ops.softmax(scores, -1), v, False, False)
    config = {
        "INFERENCE_NUM_THREADS": str(threads),
        "INFERENCE_PRECISION_HINT": "bf16",
        "PERF_COUNT": "YES",
    }
    compiled = ov.Core().compile_model(ov.Model([context], [q, k, v]), "CPU", config)
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    request.infer(feeds)
    best = float("inf")
    for _ in range(runs):
        request.infer(feeds)
        best = min(best, sum(info.real_time.total_seconds() for info in request.profiling_info))
    return best


def _static_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[graph_input.name], strict=True):
            dim.ClearField("dim_param")
            dim.dim_value = value
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def matrix_macs(graph: Path, shapes: dict[str, list[int]]) -> tuple[dict[str, int], list]:
    """Multiply-adds of MatMul/Gemm/Conv at these input shapes: weight x activation apart
    from activation x activation (attention), which int8 paths usually keep in float; and the
    query shape [batch, heads, tokens, head_dim] of every attention score product."""
    model = _static_shapes(onnx.load(str(graph), load_external_data=False), shapes)
    known = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    }
    known |= {init.name: list(init.dims) for init in model.graph.initializer}
    constants = {init.name for init in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    totals = {"weight": 0, "activation": 0}
    attention = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        out = known.get(node.output[0])
        first, second = known.get(node.input[0]), known.get(node.input[1])
        if not out or not first or not second or 0 in out:
            raise ValueError(f"no static shape for {node.name} ({node.op_type})")
        if node.op_type == "Conv":  # out [N, C_out, H, W]; weight [C_out, C_in, kH, kW]
            macs = int(np.prod(out)) * int(np.prod(second[1:]))
        else:
            macs = int(np.prod(out)) * first[-1]
        kind = "weight" if node.input[1] in constants else "activation"
        totals[kind] += macs
        if kind == "activation" and len(out) == 4 and out[-1] == out[-2] == first[-2]:
            attention.append(first)  # q [B, H, T, D] x k^T -> scores [B, H, T, T]
    return totals, attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--measured", type=Path, help="benchmarks.cpu JSON to set against")
    args = parser.parse_args()

    kernels = {
        "onnxruntime int8": peak_ops_per_s("int8", args.threads),
        "onnxruntime fp32": peak_ops_per_s("fp32", args.threads),
        "openvino int8": openvino_peak_ops_per_s("int8", args.threads),
        "openvino bf16": openvino_peak_ops_per_s("bf16", args.threads),
    }
    print(f"GEMM peaks ({args.threads} threads, {GEMM_SIZE}^3), TOPS:")
    for name, rate in kernels.items():
        print(f"  {name:<18} {rate / 1e12:.3f}" if rate else f"  {name:<18} -")
    # The floor takes the fastest int8 kernel either library has on this CPU.
    peaks = {
        "int8": max(r for k, r in kernels.items() if r and k.endswith("int8")),
        "fp32": kernels["onnxruntime fp32"],
    }
    measured = json.loads(args.measured.read_text()) if args.measured else None
    rows = {}
    for case, (tower, shapes) in CASES.items():
        macs, attention = matrix_macs(args.bundle / f"{tower}.onnx", shapes)
        ops = 2 * (macs["weight"] + macs["activation"])
        row = {
            "gops_weight": 2 * macs["weight"] / 1e9,
            "gops_attention": 2 * macs["activation"] / 1e9,
            "floor_int8_s": ops / peaks["int8"],
            "floor_fp32_s": ops / peaks["fp32"],
        }
        layer_s = openvino_attention_s(attention[0], args.threads) if attention else 0.0
        if layer_s is not None:
            row["attention_kernel_s"] = layer_s * len(attention)
            row["floor_kernels_s"] = 2 * macs["weight"] / peaks["int8"] + row["attention_kernel_s"]
        if measured:
            row["best"] = _best_measured(measured, case)
        rows[case] = row
        print(
            f"{case:<14} {ops / 1e9:8.1f} GOP ({2 * macs['activation'] / 1e9:.1f} attention)  "
            f"floor int8 {row['floor_int8_s']:.3f} s  fp32 {row['floor_fp32_s']:.3f} s"
            + (
                f"  with attention's kernel {row['floor_kernels_s']:.3f} s"
                if "floor_kernels_s" in row
                else ""
            )
            + (
                f"  best {row['best']['engine']} {row['best']['s']:.3f} s = "
                f"{row['floor_int8_s'] / row['best']['s']:.0%} of the int8 floor, "
                f"{row.get('floor_kernels_s', 0) / row['best']['s']:.0%} of the one with "
                "attention's kernel"
                if row.get("best")
                else ""
            )
        )
    if args.out:
        payload = {
            "machine": machine_info(args.threads),
            "threads": args.threads,
            "peak_ops_per_s": peaks,
            "kernels_ops_per_s": kernels,
            "cases": rows,
        }
        write_json(args.out, payload)


def _best_measured(measured: dict, case: str) -> dict | None:
    """Fastest engine of a benchmarks.cpu run for `case` that kept cosine >= 0.99."""
    tower = CASES[case][0]
    best = None
    for engine, result in measured.get("engines", {}).items():
        tower_result = result.get(tower) or {}
        entry = tower_result.get("cases", {}).get(case)
        if not entry or "median_ms" not in entry or tower_result.get("cosine_min", 0) < 0.99:
            continue
        if best is None or entry["median_ms"] / 1000 < best["s"]:
            best = {"engine": engine, "s": entry["median_ms"] / 1000}
    return best


if __name__ == "__main__":
    main()
