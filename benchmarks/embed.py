"""`clipedge embed` against the model alone and the loop users write, on the same images.

Side by side in one run, on `--count` photo-like 1280x848 JPEGs: the model-only rate
(preprocessed pixels through `run` + `finish`, nothing else), `clipedge embed` end to end for
each `--workers` value, the plain loop (`model.encode_image(paths)` per batch, `np.save`),
the time a re-run takes to skip the finished shards, and each run's peak RSS (the process and
its workers).

With `--ray`: texts instead (`--count` lines, shards of 10 000), `clipedge embed` in one
process against `--ray` on a local Ray instance of `--ray-cpus` CPUs (started before the
clock, as a cluster would be; the actors' start and model load are inside it), and `--ray`
with the instance's start inside the clock, side by side, with each run's peak RSS.

Usage: python -m benchmarks.embed --bundle DIR [--precision int8-cpu] [--count 64]
       python -m benchmarks.embed --bundle tests/fixtures/tiny-bundle --ray --count 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .charts import add_output_arguments, run_or_render
from .common import markdown_table, photo_like_pixels, save_jpeg
from .machine import machine_info

CHILD = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
import clipedge
from clipedge.embed.job import EmbedJob, embed
mode, bundle, folder, out, precision, workers, batch = sys.argv[1:8]
paths = sorted(Path(folder).glob("*.jpg"))
start = time.perf_counter()
if mode == "embed":
    job = EmbedJob(Path(bundle), folder, "images", Path(out), workers=int(workers),
                   batch_size=int(batch), precision=precision or None, shard_size=1000)
    embed(job, progress=False)
elif mode == "loop":
    model = clipedge.load(bundle, precision=precision or None)
    for i in range(0, len(paths), int(batch)):
        np.save(Path(out) / f"{i}.npy", model.encode_image(paths[i : i + int(batch)]))
else:  # model only: pixels prepared before the clock starts
    model = clipedge.load(bundle, precision=precision or None)
    prepared = model.tower("vision").prepare(paths)
    options = model.finish_options(None, True)
    pipeline = model.pipeline("vision")
    pipeline.run_rows([prepared.row(0)], 1, options)  # session created
    start = time.perf_counter()
    pipeline.embed(prepared, int(batch), options)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(
    resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "images_per_s": len(paths) / seconds, "peak_kb": peak}))
"""


TEXT_CHILD = """
import json, resource, sys, time
from pathlib import Path
mode, bundle, source, out, precision, batch, cpus = sys.argv[1:8]
import ray
from clipedge.embed.job import EmbedJob, embed
from clipedge.embed.ray_data import embed_with_ray
start = time.perf_counter()
if mode == "ray":  # a running instance, as on a cluster
    ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    start = time.perf_counter()
elif mode == "ray+start":
    ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
job = EmbedJob(Path(bundle), source, "texts", Path(out), batch_size=int(batch),
               precision=precision or None, shard_size=10000)
summary = (embed if mode == "local" else embed_with_ray)(job, progress=False)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(
    resource.RUSAGE_CHILDREN).ru_maxrss
rows = summary.done + summary.failed
print(json.dumps({"seconds": seconds, "items_per_s": rows / seconds, "peak_kb": peak}))
"""
RAY_MODES = {
    "clipedge embed (one process)": "local",
    "clipedge embed --ray (running instance)": "ray",
    "clipedge embed --ray (instance started in the clock)": "ray+start",
}


def run_texts(args: argparse.Namespace) -> dict:
    """`clipedge embed` against `--ray` on the same texts, one child process each."""
    results: dict = {
        "machine": machine_info(),
        "count": args.count,
        "batch_size": args.batch_size,
        "texts": True,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "texts.txt"
        lines = (f"a caption about item {i} " * (1 + i % 4) for i in range(args.count))
        source.write_text("".join(line + "\n" for line in lines))
        for name, mode in RAY_MODES.items():
            command = [sys.executable, "-c", TEXT_CHILD, mode, str(args.bundle), str(source)]
            command += [str(Path(tmp) / mode), args.precision, str(args.batch_size)]
            command += [str(args.ray_cpus)]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            results["runs"][name] = json.loads(result.stdout.strip().splitlines()[-1])
    return results


def photos(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = photo_like_pixels(rng, brightness=150 + i % 100)
        save_jpeg(pixels, folder / f"photo{i:05d}.jpg")


def child(mode: str, args: argparse.Namespace, folder: Path, out: Path, workers: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        CHILD,
        mode,
        str(args.bundle),
        str(folder),
        str(out),
        args.precision,
        str(workers),
        str(args.batch_size),
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(results: dict) -> None:
    """Each run's time, rate, share of the reference run's rate and peak RSS."""
    runs = results["runs"]
    texts = bool(results.get("texts"))
    unit, reference = (
        ("texts", "clipedge embed (one process)") if texts else ("images", "model only")
    )
    if texts:
        print(f"{results['count']} texts, batch {results['batch_size']}")
    else:
        print(f"{results['count']} images 1280x848, batch {results.get('batch_size', 8)}")
    key = "items_per_s" if texts else "images_per_s"
    rows = [
        (
            name,
            f"{row['seconds']:.2f}",
            f"{row[key]:.0f}" if texts else f"{row[key]:.2f}",
            f"{row[key] / runs[reference][key]:.0%}",
            f"{row['peak_kb'] / 1e6:.2f}",
        )
        for name, row in runs.items()
    ]
    versus = "vs one process" if texts else "vs model only"
    header = ("run", "s", f"{unit}/s", versus, "peak RSS GB" + (" (driver)" if texts else ""))
    print(markdown_table(header, rows, "lrrrr"))


def render_charts(results: dict, folder: Path) -> list[Path]:
    """Images per second of each way to embed a folder, the model alone as the line."""
    from .charts import Line, bar_chart

    if results.get("texts"):
        return []
    runs = {k: v for k, v in results["runs"].items() if not k.startswith("re-run")}
    model = Line(results["runs"]["model only"]["images_per_s"], "model only")
    subtitle = f"{results['machine']['cpu']}, {results['count']} images"
    return [
        bar_chart(
            folder / "embed-rate.png",
            "clipedge embed: images per second",
            list(runs),
            [r["images_per_s"] for r in runs.values()],
            "images/s",
            [model],
            subtitle,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--precision", default="")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--ray", action="store_true", help="texts: one process against --ray")
    parser.add_argument("--ray-cpus", type=int, default=2)
    add_output_arguments(parser)
    args = parser.parse_args()
    run_or_render(args, run_texts if args.ray else run, print_table, render_charts)


def run(args: argparse.Namespace) -> dict:
    results: dict = {
        "machine": machine_info(),
        "count": args.count,
        "batch_size": args.batch_size,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        photos(folder, args.count)
        runs = results["runs"]
        runs["model only"] = child("model", args, folder, Path(tmp) / "m", 0)
        for workers in (int(w) for w in args.workers.split(",")):
            out = Path(tmp) / f"embed{workers}"
            runs[f"clipedge embed, {workers} workers"] = child("embed", args, folder, out, workers)
        runs["re-run over finished shards"] = child("embed", args, folder, out, workers)
        runs["plain loop (encode_image + np.save)"] = child(
            "loop", args, folder, Path(tmp) / "l", 0
        )
    return results


if __name__ == "__main__":
    main()
