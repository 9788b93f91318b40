"""`python -m benchmarks.long_text`: one long text per CPU backend and precision.

What one text of `--tokens` tokens (default 8192, the model's limit) costs over the loaded
model: peak RSS above the RSS after loading (and a warm-up of short texts), and its seconds.
Each (backend, precision) runs in its own child process (`clipedge.load(...).encode_text`),
one at a time. `--portable` adds, for onnxruntime's CPU fp32, the same bundle without its
onnxruntime CPU form (a hard-linked copy whose manifest drops `onnxruntime_cpu_file`): the
exported attention as written, which materialises [heads, L, L] scores per layer.

    python -m benchmarks.long_text --bundle /tmp/clipedge-bench/bundle --portable \\
        --out /tmp/clipedge-bench/long-text.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import markdown_table, run_module, write_json

CPU_RUNS = {"cpu": ("fp32", "int8-cpu", "int8"), "openvino": ("fp32", "int8-ov")}
GB = 1e9


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(bundle: str, backend: str, precision: str, tokens: int) -> dict:
    """Runs in the child: load, warm up, reset the peak counter, encode the long text."""
    import clipedge

    model = clipedge.load(
        bundle, backend=backend, precision=precision, verify_checksums=False, max_length=tokens
    )
    model.encode_text(["a warm-up text", "and another one"])
    words = [f"word{i % 997}" for i in range(tokens * 2)]  # far more than `tokens` tokens
    loaded = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    model.encode_text(" ".join(words), max_length=tokens)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {
        "backend": backend,
        "precision": precision,
        "graph": model.plan.towers["text"].graph.name,
        "tokens": tokens,
        "seconds": seconds,
        "loaded_bytes": loaded,
        "peak_over_loaded_bytes": peak - loaded,
    }


def portable_copy(bundle: Path, into: Path) -> Path:
    """The bundle without its onnxruntime CPU forms: hard links, an edited manifest."""
    copy = into / bundle.name
    copy.mkdir()
    for path in bundle.iterdir():
        if path.is_file() and path.name != "clipedge.json":
            os.link(path, copy / path.name)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    for tower in manifest["towers"].values():
        for graph in tower["graphs"].values():
            graph.pop("onnxruntime_cpu_file", None)
    (copy / "clipedge.json").write_text(json.dumps(manifest))
    return copy


def measure(bundle: Path, backend: str, precision: str, tokens: int, label: str) -> dict:
    args = ["--child", str(bundle), backend, precision, "--tokens", str(tokens)]
    done = run_module("benchmarks.long_text", args)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"label": label, "backend": backend, "precision": precision, "error": tail[0]}
    return {"label": label, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", help="repeatable")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--portable", action="store_true", help="also the uncompiled attention")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("BUNDLE", "BACKEND", "PRECISION"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.tokens)))
        return 0
    import clipedge
    from clipedge.bundle.manifest import read_manifest

    from .machine import describe, machine_info

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for bundle in args.bundle:
            graphs = read_manifest(bundle).towers["text"].graphs
            runs = [
                (backend, precision)
                for backend, precisions in CPU_RUNS.items()
                for precision in precisions
                if precision in graphs and (backend != "openvino" or _has_openvino())
            ]
            if args.portable:
                label = "cpu fp32, portable attention"
                rows.append(
                    measure(portable_copy(bundle, Path(scratch)), "cpu", "fp32", args.tokens, label)
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
            for backend, precision in runs:
                rows.append(
                    measure(bundle, backend, precision, args.tokens, f"{backend} {precision}")
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    table = markdown_table(
        ["run", "graph", "seconds", "loaded GB", "peak over loaded GB"],
        [
            (
                r["label"],
                r.get("graph", r.get("error", "")),
                f"{r['seconds']:.1f}" if "seconds" in r else "-",
                f"{r['loaded_bytes'] / GB:.2f}" if "loaded_bytes" in r else "-",
                f"{r['peak_over_loaded_bytes'] / GB:+.2f}" if "loaded_bytes" in r else "-",
            )
            for r in rows
        ],
    )
    print(describe(machine_info()))
    print(table)
    if args.out:
        write_json(
            args.out,
            {"machine": machine_info(), "clipedge": clipedge.__version__, "rows": rows},
        )
    return 0


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


if __name__ == "__main__":
    sys.exit(main())
