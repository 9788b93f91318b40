"""What the benchmarks share: input types, timing loops, cosines, photo-like test pictures,
markdown tables, JSON output, child processes and the PyTorch towers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], np.ndarray]

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "jina-clip-v2-tiny"
INPUT_ORDER = ("input_ids", "attention_mask", "pixel_values")


# --------------------------------------------------------------------------- timing


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall milliseconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_calls(
    fn: Callable[[], Any],
    min_runs: int,
    max_runs: int,
    budget_s: float,
    slow_min_runs: int | None = None,
) -> tuple[dict[str, Any], Any]:
    """The first call (a per-shape compile included), one warm-up, then timed calls: at least
    `min_runs` (`slow_min_runs` when `min_runs` warm calls would exceed `budget_s`), more up to
    `max_runs` while within the budget. Returns the timing and the first call's output."""
    start = time.perf_counter()
    output = fn()
    first = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    warm = time.perf_counter() - start
    wanted = min_runs
    if slow_min_runs is not None and warm * min_runs > budget_s:
        wanted = slow_min_runs
    times: list[float] = []
    budget_end = time.perf_counter() + budget_s
    while len(times) < wanted or (len(times) < max_runs and time.perf_counter() < budget_end):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    timing = {
        "first_call_s": round(first, 3),
        "median_ms": round(1000 * statistics.median(times), 3),
        "n": len(times),
        "times_ms": [round(1000 * t, 2) for t in times],
    }
    return timing, output


# --------------------------------------------------------------------------- outputs


def cosines(outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of each row (item) of `outputs` to the same row of `reference`, in float64."""
    a = outputs.astype(np.float64).reshape(outputs.shape[0], -1)
    b = reference.astype(np.float64).reshape(reference.shape[0], -1)
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# --------------------------------------------------------------------------- inputs


def photo_like_pixels(
    rng: np.random.Generator, width: int = 1280, height: int = 848, brightness: float = 200.0
) -> np.ndarray:
    """A smooth colour gradient with sensor-like noise, uint8 [height, width, 3]: JPEG-codes
    like a photo (which random pixels do not)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * brightness
    noise = rng.normal(0, 12, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_jpeg(pixels: np.ndarray, path: Path, quality: int = 90) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path, quality=quality)
    return path


# --------------------------------------------------------------------------- reports


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table; `align` has one letter per column, `r` for right-aligned numbers."""
    marks = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- processes


def run_module(module: str, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m module args` in a child process that can import `benchmarks` from any
    working directory; output captured as text."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)


# --------------------------------------------------------------------------- PyTorch towers


def torch_tower(checkpoint: Path, tower: str) -> Any:
    """One tower of a checkpoint as the exporter builds it (`clipedge.export.weights`)."""
    from clipedge.export.source import resolve_source
    from clipedge.export.weights import load_towers

    source = resolve_source(str(checkpoint))
    return load_towers(source.config, source.open_tensors(), [tower])[tower]


def torch_inputs(feed: Feed) -> list[np.ndarray]:
    """A feed's arrays in the towers' argument order."""
    return [feed[name] for name in sorted(feed, key=INPUT_ORDER.index)]


def tree_rss(proc: Any) -> int:
    """RSS of a `psutil.Process` and all its descendants (0 for those that are gone)."""
    import psutil

    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def stream_child(
    command: list[str], on_line: Callable[[str], object]
) -> tuple[subprocess.Popen, threading.Thread]:
    """Start `command` (unbuffered Python output) with each line of its stdout and stderr
    handed to `on_line` from a reader thread; join the thread after the child exits."""
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )

    def reader() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            on_line(line.rstrip())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return child, thread
