"""`python -m benchmarks.attention`: one long text and one batch of images per CPU backend
and precision, where attention's memory shows.

What one text of `--tokens` tokens (default 8192, the model's limit) and one batch of
`--images` images cost over the loaded model: peak RSS above the RSS after loading (and a
warm-up), and seconds. Each (backend, precision) runs in its own child process
(`clipedge.load(...).encode_text` / `encode_image`), one at a time. `--portable` adds, for
onnxruntime's CPU fp32, the same bundle without its onnxruntime CPU forms (a hard-linked
copy whose manifest drops `onnxruntime_cpu_file`): the exported attention as written, which
materialises [batch, heads, L, L] scores per layer. `--planner-reuse` adds, for each
onnxruntime CPU run, the same run with the allocation planner's buffer reuse on (as every
onnxruntime run was before it was turned off).

    python -m benchmarks.attention --bundle /tmp/clipedge-bench/bundle --portable \\
        --out /tmp/clipedge-bench/attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import markdown_table, run_module, write_json

CPU_RUNS = {"cpu": ("fp32", "int8-cpu", "int8"), "openvino": ("fp32", "int8-ov")}
GB = 1e9


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _peak_over(run) -> tuple[float, int, int]:
    """Seconds of `run()`, the RSS before it, and the peak RSS during it over that."""
    loaded = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return seconds, loaded, _status_bytes("VmHWM") - loaded


def _long_text(model, size: int):
    """One text of `size` tokens, after a warm-up."""
    model.encode_text(["a warm-up text", "and another one"])
    text = " ".join(f"word{i % 997}" for i in range(size * 2))  # over `size` tokens
    return _peak_over(lambda: model.encode_text(text, max_length=size))


def _image_batch(model, size: int):
    """One batch of `size` photo-like images, after a warm-up."""
    from .common import photo_like_pixels

    rng = np.random.default_rng(0)
    images = [photo_like_pixels(rng, 640, 480) for _ in range(size)]
    model.encode_image(images[:1])
    return _peak_over(lambda: model.encode_image(images, batch_size=size))


WORKLOADS = {"text": _long_text, "vision": _image_batch}


def child(bundle: str, backend: str, precision: str, tower: str, size: int, reuse: bool) -> dict:
    """Runs in the child: load, warm up, then one text of `size` tokens or `size` images."""
    import clipedge
    from clipedge.engine.onnxruntime_backend import OnnxruntimeOptions

    model = clipedge.load(
        bundle,
        backend=backend,
        precision=precision,
        verify_checksums=False,
        max_length=size,
        backend_options=OnnxruntimeOptions(memory_reuse=True) if reuse else None,
    )
    seconds, loaded, over = WORKLOADS[tower](model, size)
    return {
        "backend": backend,
        "precision": precision,
        "tower": tower,
        "size": size,
        "graph": model.plan.towers[tower].graph.name,
        "seconds": seconds,
        "loaded_bytes": loaded,
        "peak_over_loaded_bytes": over,
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


def measure(
    bundle: Path, backend: str, precision: str, tower: str, size: int, label: str, reuse: bool
) -> dict:
    args = ["--child", str(bundle), backend, precision, tower, str(size), str(int(reuse))]
    done = run_module("benchmarks.attention", args)
    row = {"label": label, "backend": backend, "precision": precision, "tower": tower}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {**row, "error": tail[0]}
    return {**row, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", help="repeatable")
    parser.add_argument("--tokens", type=int, default=8192, help="of the one text (0: none)")
    parser.add_argument("--images", type=int, default=32, help="in the one batch (0: none)")
    parser.add_argument("--portable", action="store_true", help="also the unfused attention")
    parser.add_argument(
        "--planner-reuse", action="store_true", help="also onnxruntime with buffer reuse on"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--child", nargs=6, metavar=("BUNDLE", "BACKEND", "PRECISION", "TOWER", "N", "REUSE")
    )
    args = parser.parse_args(argv)
    if args.child:
        *where, size, reuse = args.child
        print(json.dumps(child(*where, int(size), reuse == "1")))
        return 0
    import clipedge
    from clipedge.bundle.manifest import read_manifest

    from .machine import describe, machine_info

    sizes = {"text": args.tokens, "vision": args.images}
    rows = []

    def run(bundle: Path, backend: str, precision: str, tower: str, label: str) -> None:
        reuses = (False, True) if args.planner_reuse and backend == "cpu" else (False,)
        for reuse in reuses:
            name = label + (", planner reuse on" if reuse else "")
            rows.append(measure(bundle, backend, precision, tower, sizes[tower], name, reuse))
            print(json.dumps(rows[-1]), file=sys.stderr)

    with tempfile.TemporaryDirectory() as scratch:
        for bundle in args.bundle:
            manifest = read_manifest(bundle)
            portable = portable_copy(bundle, Path(scratch)) if args.portable else None
            for tower, size in sizes.items():
                graphs = manifest.towers[tower].graphs if tower in manifest.towers else {}
                if not size or not graphs:
                    continue
                if portable is not None:
                    run(portable, "cpu", "fp32", tower, "cpu fp32, portable attention")
                for backend, precisions in CPU_RUNS.items():
                    for precision in precisions:
                        if precision in graphs and (backend != "openvino" or _has_openvino()):
                            run(bundle, backend, precision, tower, f"{backend} {precision}")
    table = markdown_table(
        ["tower", "run", "graph", "seconds", "loaded GB", "peak over loaded GB"],
        [
            (
                f"{r['tower']} x {sizes[r['tower']]}",
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
            args.out, {"machine": machine_info(), "clipedge": clipedge.__version__, "rows": rows}
        )
    return 0


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


if __name__ == "__main__":
    sys.exit(main())
