"""GPU engines side by side: latency and throughput per tower, precision and batch size.

Engines (each skipped with its reason where this machine lacks it):
- `trt-native`: the bundle's native TensorRT engines (`clipedge build-engine`), fp32/fp16/int8;
- `ort-cuda`: onnxruntime's CUDA provider on the fp32/fp16/int8 graphs;
- `ort-trt`: onnxruntime's TensorRT provider on the same graphs (engine cache in --work);
- `torch-eager-fp16`, `torch-compile-fp16`: the PyTorch towers from the checkpoint, fp16
  autocast on CUDA (torch.compile's first call per shape is reported apart).
Batch sizes 1, 8, 32 by default; texts are `--text-length` random tokens over the
vocabulary, images random pixels at the tower's size. Per row: median ms of n runs after a
warm-up, items per second, the first call, and cosine to `ort-cuda` fp32 on the same inputs.

Each engine runs in its own child process (a crash or an out-of-memory costs one row).

    python -m benchmarks.gpu --bundle BUNDLE --checkpoint CKPT --work /tmp/gpu \
        --out /tmp/gpu/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipedge.towers import TEXT

from .common import Feed, Runner, cosines, run_module, time_calls, torch_inputs, torch_tower
from .machine import machine_info

ENGINES = {
    "ort-cuda": "onnxruntime CUDA execution provider (the cosine reference at fp32)",
    "trt-native": "native TensorRT engines of the bundle (clipedge build-engine)",
    "ort-trt": "onnxruntime TensorRT execution provider",
    "torch-eager-fp16": "PyTorch eager, fp16 autocast on CUDA",
    "torch-compile-fp16": "PyTorch torch.compile, fp16 autocast on CUDA",
}
PRECISIONS = ("fp32", "fp16", "int8")
MIN_RUNS, MAX_RUNS, BUDGET_S = 10, 200, 5.0


def feeds(bundle: Path, tower: str, batch: int, length: int, seed: int = 0) -> Feed:
    from clipedge.bundle.manifest import read_manifest

    spec = read_manifest(bundle).towers[tower]
    rng = np.random.default_rng(seed + batch)
    if tower == TEXT.name:
        ids = rng.integers(5, 250002, (batch, length)).astype(np.int64)
        ids[:, 0] = 0  # <s>
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    size = spec.settings.image_size
    return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def clamp_vocab(bundle: Path, feed: Feed) -> Feed:
    """The tiny test bundle has a small vocabulary: keep ids inside it."""
    import onnx

    if "input_ids" not in feed:
        return feed
    graph = onnx.load(str(bundle / "text.onnx"), load_external_data=False)
    rows = [
        int(t.dims[0]) for t in graph.graph.initializer if len(t.dims) == 2 and "embed" in t.name
    ]
    if rows:
        feed = dict(feed)
        feed["input_ids"] = feed["input_ids"] % max(rows)
    return feed


def load(engine: str, tower: str, precision: str, args: argparse.Namespace) -> Runner:
    bundle = args.bundle
    from clipedge.bundle.manifest import read_manifest

    manifest = read_manifest(bundle)
    spec = manifest.towers[tower]
    if engine.startswith("torch"):
        if precision != "fp16":
            raise LookupError("PyTorch rows are fp16 autocast only")
        return _load_torch(engine, tower, args)
    if precision not in spec.graphs:
        raise LookupError(f"the bundle has no {precision} {tower} graph")
    graph = bundle / spec.graphs[precision].file
    if engine == "trt-native":
        from clipedge.engine.tensorrt_backend import TensorrtOptions, open_session

        session = open_session(graph, spec, TensorrtOptions(max_contexts=1), True)
        return session.run
    from clipedge.engine.onnxruntime_backend import OrtSession, TensorrtEpOptions
    from clipedge.engine.profiles import ProfileLimits

    if engine == "ort-cuda":
        session = OrtSession(graph, "cuda", None, spec, True)
    else:
        limits = ProfileLimits(
            max_batch=max(args.batches),
            opt_batch=min(8, max(args.batches)),
            max_length=max(args.text_length, 1),
            opt_length=max(args.text_length, 1),
        )
        options = TensorrtEpOptions(limits=limits, cache_dir=args.work / "ort-trt-cache")
        session = OrtSession(graph, "tensorrt", options, spec, True)
    expected = "CUDAExecutionProvider" if engine == "ort-cuda" else "TensorrtExecutionProvider"
    if session.provider != expected:
        raise LookupError(f"{expected} did not start (runs on {session.provider})")
    return session.run


def _load_torch(engine: str, tower: str, args: argparse.Namespace) -> Runner:
    import torch

    if args.checkpoint is None:
        raise LookupError("no --checkpoint for the PyTorch towers")
    if not torch.cuda.is_available():
        raise LookupError("torch has no CUDA here")
    module = torch_tower(args.checkpoint, tower).cuda().eval()
    if engine == "torch-compile-fp16":
        module = torch.compile(module)

    def run(feed: Feed) -> np.ndarray:
        tensors = [torch.from_numpy(array).cuda() for array in torch_inputs(feed)]
        with torch.inference_mode(), torch.autocast("cuda", torch.float16):
            out = module(*tensors).float().cpu().numpy()
        return out

    return run


def time_runs(run: Runner, feed: Feed) -> tuple[dict[str, Any], np.ndarray]:
    """Timing (with items per second) and the first call's output."""
    timing, output = time_calls(lambda: run(feed), MIN_RUNS, MAX_RUNS, BUDGET_S)
    batch = next(iter(feed.values())).shape[0]
    timing["items_per_s"] = round(1000 * batch / timing["median_ms"], 1)
    return timing, output


def run_child(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One engine, every tower / precision / batch, in this process."""
    rows = []
    precisions = ("fp16",) if args.engine.startswith("torch") else PRECISIONS
    for tower in args.towers:
        for precision in precisions:
            try:
                runner = load(args.engine, tower, precision, args)
            except Exception as exc:
                rows.append(
                    {
                        "tower": tower,
                        "precision": precision,
                        "skipped": f"{type(exc).__name__}: {exc}",
                    }
                )
                continue
            for batch in args.batches:
                feed = clamp_vocab(args.bundle, feeds(args.bundle, tower, batch, args.text_length))
                row: dict[str, Any] = {"tower": tower, "precision": precision, "batch": batch}
                try:
                    timing, output = time_runs(runner, feed)
                    np.save(args.work / f"{args.engine}-{tower}-{precision}-{batch}.npy", output)
                    row.update(timing)
                except Exception as exc:  # e.g. out of memory at batch 32
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
    return rows


def cosine_to_reference(work: Path, engine: str, row: dict[str, Any]) -> float | None:
    ours = work / f"{engine}-{row['tower']}-{row['precision']}-{row['batch']}.npy"
    ref = work / f"ort-cuda-{row['tower']}-fp32-{row['batch']}.npy"
    if not ours.is_file() or not ref.is_file():
        return None
    return round(float(cosines(np.load(ours), np.load(ref)).min()), 6)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| engine | tower | precision | batch | median ms | items/s | first call s | cos min |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine, rows in results["engines"].items():
        for row in rows:
            reason = " ".join(str(row.get("skipped") or row.get("error") or "").split())
            if "skipped" in row:
                lines.append(
                    f"| {engine} | {row['tower']} | {row['precision']} | | skipped: "
                    f"{reason[:100]} | | | |"
                )
            elif "error" in row:
                lines.append(
                    f"| {engine} | {row['tower']} | {row['precision']} | {row['batch']} | "
                    f"error: {reason[:100]} | | | |"
                )
            else:
                lines.append(
                    f"| {engine} | {row['tower']} | {row['precision']} | {row['batch']} | "
                    f"{row['median_ms']} | {row['items_per_s']} | {row['first_call_s']} | "
                    f"{row.get('cosine_min')} |"
                )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="for the PyTorch rows")
    parser.add_argument("--work", type=Path, required=True, help="outputs and caches")
    parser.add_argument("--out", type=Path, help="JSON results (markdown beside it)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--towers", default="text,vision")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--text-length", type=int, default=128)
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    args.towers = args.towers.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.engine:
        print(json.dumps(run_child(args)))
        return
    results: dict[str, Any] = {
        "machine": machine_info(packages=("numpy", "onnxruntime", "torch", "tensorrt")),
        "text_length": args.text_length,
        "engines": {},
    }
    for engine in args.engines.split(","):
        started = time.perf_counter()
        child = run_module(__spec__.name, [*sys.argv[1:], "--engine", engine])
        if child.returncode != 0 or not child.stdout.strip():
            results["engines"][engine] = [
                {"tower": "-", "precision": "-", "skipped": child.stderr.strip()[-300:]}
            ]
            continue
        rows = json.loads(child.stdout.strip().splitlines()[-1])
        for row in rows:
            if "median_ms" in row:
                row["cosine_min"] = cosine_to_reference(args.work, engine, row)
        results["engines"][engine] = rows
        print(f"{engine}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    table = markdown(results)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
