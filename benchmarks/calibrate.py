"""Wall time and peak RSS of `clipedge calibrate`, per precision and tower, on a bundle.

Each (tower, precision) runs as its own `clipedge calibrate BUNDLE --towers T --precisions P`
child process (defaults otherwise, so the search runs when the whole tower misses), while
the process tree's RSS is polled every 0.2 s (psutil); the kernel's `ru_maxrss` of the
children is recorded too (the largest single process, exact). The command's own per-stage
log lines (`[calibrate] vision int8-ov: search: ranking 4.5 min, peak RSS 5.2 GB`) are kept,
with the held-out minimum cosine it reports.

    python -m benchmarks.calibrate /tmp/calib-work/bundle \\
        --calibration-images /tmp/calib-work/photos \\
        --calibration-texts tests/fixtures/calibration/captions.jsonl \\
        --precisions int8-ov --towers vision,text --out /tmp/calib-work/calibrate.json

The bundle gains the calibrated graphs (as `clipedge calibrate` would); run it on a copy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from .common import markdown_table, stream_child, tree_rss, write_json
from .machine import describe, machine_info

POLL_S = 0.2
STAGE = re.compile(
    r"^\[calibrate\] (?P<scope>[^:]+): (?P<stage>.+) (?P<time>[\d.]+ (?:s|min)), "
    r"peak RSS (?P<gb>[\d.]+) GB"
)
COSINE = re.compile(r"^\[calibrate\] (?P<scope>[^:]+): min cosine (?P<cos>[\d.]+) (?P<result>.+)$")


def calibrate_command(bundle: Path, tower: str, precision: str, extra: list[str]) -> list[str]:
    script = Path(sys.executable).with_name("clipedge")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "clipedge.cli"]
    return [*base, "calibrate", str(bundle), "--towers", tower, "--precisions", precision, *extra]


def run_one(command: list[str], log: Path, kill_above_gb: float | None = None) -> dict[str, Any]:
    """Run one calibration, polling the process tree's RSS; its output goes to `log`. Over
    `kill_above_gb` the child is killed (a guard for shared machines: the run is recorded as
    killed, with the RSS it had reached)."""
    lines: list[str] = []
    start = time.perf_counter()
    with log.open("w") as sink:

        def on_line(line: str) -> None:
            lines.append(line)
            sink.write(line + "\n")
            sink.flush()
            print(f"  | {line}", flush=True)

        child, thread = stream_child(command, on_line)
        proc = psutil.Process(child.pid)
        peak, killed = 0, False
        while child.poll() is None:
            peak = max(peak, tree_rss(proc))
            if kill_above_gb is not None and peak > kill_above_gb * 1e9 and not killed:
                killed = True
                for member in [*proc.children(recursive=True), proc]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        member.kill()
            time.sleep(POLL_S)
        thread.join(timeout=10)
    wall = time.perf_counter() - start
    stages = [m.groupdict() for m in map(STAGE.match, lines) if m]
    cosines = [m.groupdict() for m in map(COSINE.match, lines) if m]
    return {
        "command": command,
        "returncode": child.returncode,
        "killed_above_gb": kill_above_gb if killed else None,
        "wall_s": round(wall, 1),
        "peak_rss_tree_gb": round(peak / 1e9, 2),
        "ru_maxrss_children_gb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, 2
        ),
        "stages": stages,
        "cosines": cosines,
        "log": str(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calibration-images", required=True)
    parser.add_argument("--calibration-texts", required=True)
    parser.add_argument("--precisions", default="int8-ov,int8-cpu,fp16,int8")
    parser.add_argument("--towers", default="text,vision")
    parser.add_argument("--max-memory", default=None, help="passed on to clipedge calibrate")
    parser.add_argument("--extra", default="", help="more clipedge calibrate arguments, one string")
    parser.add_argument(
        "--kill-above",
        type=float,
        default=None,
        metavar="GB",
        help="kill a run whose process tree passes this RSS (shared machines)",
    )
    parser.add_argument("--out", type=Path, default=Path("calibrate-bench.json"))
    args = parser.parse_args()
    extra = [
        "--calibration-images",
        args.calibration_images,
        "--calibration-texts",
        args.calibration_texts,
        "--allow-below-target",
        *(["--max-memory", args.max_memory] if args.max_memory else []),
        *args.extra.split(),
    ]
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "runs": [],
    }
    print(describe(results["machine"]))
    for precision in args.precisions.split(","):
        for tower in args.towers.split(","):
            command = calibrate_command(args.bundle, tower, precision, extra)
            log = args.out.with_name(f"{args.out.stem}-{tower}-{precision}.log")
            print(f"{tower} {precision}: {' '.join(command)}", flush=True)
            run = {"tower": tower, "precision": precision, **run_one(command, log, args.kill_above)}
            results["runs"].append(run)
            write_json(args.out, results)
    rows = [
        [
            r["tower"],
            r["precision"],
            f"{r['wall_s'] / 60:.1f} min",
            f"{r['peak_rss_tree_gb']:.1f} GB",
            next((c["cos"] for c in r["cosines"]), "-"),
            r["returncode"],
        ]
        for r in results["runs"]
    ]
    print(
        markdown_table(
            ["tower", "precision", "wall", "peak RSS (tree)", "held-out min cos", "rc"],
            rows,
            "llrrrr",
        )
    )


if __name__ == "__main__":
    main()
