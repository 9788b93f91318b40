"""Where an OpenVINO graph spends its time, by layer kind and by the precision it ran in.

Why: a tower that is slower than its int8 floor is slow somewhere; OpenVINO's per-node
profile (PERF_COUNT) says which kernels ran, in which precision (`brgemm_avx512_amx_I8`,
`..._bf16`, ...) and for how long. Each executed node is mapped back to the ONNX node it came
from, and from there to the PyTorch module scope the exporter recorded (`blocks.3.mlp.w3`),
so time is summed per layer kind (`attn.qkv`, `attn` = score and context products,
`attn.proj`, `mlp.w12`, `mlp.w3`, `norm`, ...).

    .venv/bin/python -m benchmarks.profile_openvino --graph BUNDLE/vision.int8-ov.xml \
        --fp32 BUNDLE/vision.onnx [--runs 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from clipedge.calibration.blocks import BLOCK, scopes_of

INPUT_SHAPES = {"pixel_values": (1, 3, 512, 512), "input_ids": (1, 512), "attention_mask": (1, 512)}


def layer_kinds(fp32_graph: Path) -> dict[str, str]:
    """ONNX node name -> its scope inside the block with the block number dropped
    (`blocks.3.mlp.w3` -> `mlp.w3`); `outside blocks` for embeddings and heads."""
    model = onnx.load(str(fp32_graph), load_external_data=False)
    kinds = {}
    for node in model.graph.node:
        scopes = scopes_of(node)
        block = next((s for s in scopes if BLOCK.match(s)), None)
        inner = [s for s in scopes if block and s.startswith(block + ".")]
        kind = inner[-1][len(block) + 1 :] if inner else ("block" if block else "outside blocks")
        kinds[node.name] = re.sub(r"\.(norm\d*|inner_attn_ln|ffn_ln)$", ".norm", kind)
    return kinds


def profile(graph: Path, kinds: dict[str, str], threads: int, runs: int) -> dict:
    """Per-kind and per-kernel milliseconds (median over `runs`) of one batch-1 call."""
    import openvino as ov

    core = ov.Core()
    config = {"PERF_COUNT": "YES", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(str(graph), "CPU", config)
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        shape = INPUT_SHAPES[port.any_name]
        feeds[port.any_name] = (
            rng.standard_normal(shape).astype(np.float32)
            if port.any_name == "pixel_values"
            else np.ones(shape, dtype=np.int64)
        )
    request.infer(feeds)
    originals = {
        node.get_friendly_name(): node.get_rt_info()["originalLayersNames"].astype(str)
        for node in compiled.get_runtime_model().get_ops()
    }
    per_run: list[dict[tuple[str, str], float]] = []
    for _ in range(runs):
        request.infer(feeds)
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3
            if ms <= 0:
                continue
            names = originals.get(info.node_name, info.node_name).split(",")
            kind = next((kinds[n] for n in names if n in kinds), "other")
            totals[(kind, f"{info.node_type}:{info.exec_type}")] += ms
        per_run.append(totals)
    keys = sorted({k for run in per_run for k in run})
    rows = {k: float(np.median([run.get(k, 0.0) for run in per_run])) for k in keys}
    return {"total_ms": sum(rows.values()), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", type=Path, required=True, help="ONNX or OpenVINO IR")
    parser.add_argument("--fp32", type=Path, required=True, help="the bundle's fp32 ONNX graph")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = profile(args.graph, layer_kinds(args.fp32), args.threads, args.runs)
    by_kind: dict[str, float] = defaultdict(float)
    for (kind, _), ms in result["rows"].items():
        by_kind[kind] += ms
    print(f"{args.graph.name}: {result['total_ms']:.0f} ms of kernel time (median of {args.runs})")
    for kind, ms in sorted(by_kind.items(), key=lambda item: -item[1]):
        kernels = sorted(
            ((k, v) for (kd, k), v in result["rows"].items() if kd == kind), key=lambda kv: -kv[1]
        )
        detail = ", ".join(f"{k} {v:.0f}" for k, v in kernels[:3] if v >= 0.5)
        print(f"  {kind:<16} {ms:8.1f} ms {ms / result['total_ms']:6.1%}  {detail}")
    if args.json:
        rows = [{"kind": k, "kernel": e, "ms": v} for (k, e), v in result["rows"].items()]
        args.json.write_text(json.dumps({"total_ms": result["total_ms"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
