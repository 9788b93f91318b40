"""The runtime's own cost around the graphs, on a full-size bundle.

Measured side by side in one run:
- overhead: in the same `encode_image(jpeg_path)` / `encode_text(strings)` calls, the wall
  time outside the graph's `run` (decode, preprocessing, tokenisation, pooling, normalising)
  as a share of the time inside it;
- import time of `clipedge` (fresh interpreters, minus the interpreter's own start-up);
- resident memory of a process that loaded the fp32 bundle and ran both towers, against the
  graphs' bytes on disk;
- the NaN/Inf check of the finish stage on each case's pooled output, against the model time.

Usage: python -m benchmarks.runtime --bundle DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import markdown_table, photo_like_pixels, save_jpeg, write_json
from .machine import machine_info

MEMORY_SCRIPT = """
import json, sys, psutil
before = psutil.Process().memory_info().rss
import clipedge
model = clipedge.load(sys.argv[1], backend="cpu", precision="fp32")
model.encode_text(["a photo of a cat"])
model.encode_image([sys.argv[2]])
print(json.dumps({"rss_before": before, "rss_after": psutil.Process().memory_info().rss}))
"""


class TimedSession:
    """Wraps a tower session and adds up the time spent inside `run`."""

    def __init__(self, session) -> None:
        self.session = session
        self.provider = session.provider
        self.inside_s = 0.0

    def run(self, feeds):
        start = time.perf_counter()
        try:
            return self.session.run(feeds)
        finally:
            self.inside_s += time.perf_counter() - start


def overhead(bundle: Path, jpeg: Path, repeats: int) -> dict:
    """Runtime time around the graph, measured inside the same calls (robust to load)."""
    import clipedge

    model = clipedge.load(bundle, backend="cpu", precision="fp32", threads=2)
    texts = ["A photo of a cat sitting on a red sofa near the window, in the morning."] * 8
    cases = {
        "image (1x 1280x848 JPEG file)": ("vision", 1, lambda: model.encode_image(str(jpeg))),
        "text (8 strings)": ("text", 8, lambda: model.encode_text(texts)),
    }
    results = {}
    for name, (tower, rows, call) in cases.items():
        timed = model._sessions[tower] = TimedSession(model.session(tower))
        call()  # warm-up
        shares, walls, insides = [], [], []
        for _ in range(repeats):
            timed.inside_s = 0.0
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
            walls.append(wall * 1000)
            insides.append(timed.inside_s * 1000)
            shares.append((wall - timed.inside_s) / timed.inside_s)
        results[name] = {
            "end_to_end_ms": statistics.median(walls),
            "model_ms": statistics.median(insides),
            "overhead_share": statistics.median(shares),
            "nan_check_ms": nan_check_ms(rows, model.manifest.embed_dim),
        }
    return results


def nan_check_ms(rows: int, dim: int, repeats: int = 2000) -> float:
    """Median time of the finish stage's non-finite check on a [rows, dim] pooled output."""
    from clipedge.postprocess import nonfinite_rows

    pooled = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
    start = time.perf_counter()
    for _ in range(repeats):
        nonfinite_rows(pooled)
    return (time.perf_counter() - start) / repeats * 1000


def import_time(repeats: int = 7) -> float:
    def run(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start

    bare = statistics.median(run("pass") for _ in range(repeats))
    full = statistics.median(run("import clipedge") for _ in range(repeats))
    return full - bare


def memory(bundle: Path, jpeg: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(bundle), str(jpeg)],
        check=True,
        capture_output=True,
        text=True,
    )
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    fp32_files = {"text.onnx", "text.onnx.data", "vision.onnx"}
    graph_bytes = sum(p.stat().st_size for p in bundle.iterdir() if p.name in fp32_files)
    loaded = rss["rss_after"] - rss["rss_before"]
    return {"graph_bytes": graph_bytes, "rss_added_bytes": loaded, "ratio": loaded / graph_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jpeg = save_jpeg(photo_like_pixels(np.random.default_rng(0)), Path(tmp) / "photo.jpg")
        results = {
            "machine": machine_info(2),
            "import_s": import_time(),
            "memory": memory(args.bundle, jpeg),
            "overhead": overhead(args.bundle, jpeg, args.repeats),
        }
    print(f"import clipedge: {results['import_s'] * 1000:.0f} ms (goal < 300 ms)")
    mem = results["memory"]
    print(
        f"loaded fp32 bundle: +{mem['rss_added_bytes'] / 1e9:.2f} GB RSS for "
        f"{mem['graph_bytes'] / 1e9:.2f} GB of graphs = {mem['ratio']:.2f}x (goal < 1.2x)"
    )
    rows = [
        (
            name,
            f"{row['end_to_end_ms']:.1f}",
            f"{row['model_ms']:.1f}",
            f"{row['overhead_share'] * 100:.2f}%",
            f"{row['nan_check_ms'] * 1000:.1f} us = "
            f"{row['nan_check_ms'] / row['model_ms'] * 100:.4f}%",
        )
        for name, row in results["overhead"].items()
    ]
    header = ("case", "end to end ms", "model ms", "overhead", "NaN/Inf check")
    print(markdown_table(header, rows, "lrrrr"))
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
