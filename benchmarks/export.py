"""Benchmark `clipedge export` on a full-size checkpoint and the exported graphs' CPU speed.

(a) Runs `clipedge export CHECKPOINT -o WORK/bundle` as a subprocess and measures its wall time
    and peak RSS (psutil poll of the process tree every 0.2 s, plus the kernel's
    `RUSAGE_CHILDREN.ru_maxrss`, which is the largest single process), per export phase, and the
    bundle's file sizes.
(b) Times the fp32 graphs in onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL) against the
    same towers in PyTorch eager fp32 (built by `clipedge.export.weights.load_towers` from the
    same checkpoint), one tower and one backend in memory at a time: one 512 px image, 8 texts x
    32 tokens, 1 text x 512 tokens. Where ONNX is not `--goal` times faster than eager (or with
    `--profile always`), both runs are profiled by op type, ORT session variants are timed, and
    the ORT-optimised graph is saved to count what fused.

    python -m benchmarks.export --checkpoint /tmp/clipedge-bench/checkpoint \
        --work /tmp/clipedge-bench/work --out /tmp/clipedge-bench/results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from clipedge.towers import VISION

from .common import cosines, stream_child, tree_rss, write_json
from .machine import machine_info

GB = 1e9
POLL_S = 0.2


# --------------------------------------------------------------------------- (a) export


@dataclass
class ExportMeasurement:
    """Wall time, memory and outputs of one `clipedge export` run."""

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_tree_bytes: int
    ru_maxrss_children_bytes: int
    phases: list[dict[str, Any]]
    bundle_files: dict[str, int]
    log_tail: list[str] = field(default_factory=list)

    @property
    def bundle_bytes(self) -> int:
        return sum(self.bundle_files.values())


def export_command(checkpoint: Path, bundle: Path) -> list[str]:
    """The `clipedge export` console script of this interpreter, or `python -m clipedge.cli`."""
    script = Path(sys.executable).with_name("clipedge")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "clipedge.cli"]
    return [*base, "export", str(checkpoint), "-o", str(bundle)]


def run_export(checkpoint: Path, bundle: Path, poll_s: float = POLL_S) -> ExportMeasurement:
    """Run the export, sampling the process tree's RSS and tagging samples with the phase."""
    if bundle.exists():
        shutil.rmtree(bundle)
    command = export_command(checkpoint, bundle)
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()

    def on_line(line: str) -> None:
        lines.append((time.perf_counter() - start, line))
        print(f"  | {line}", flush=True)

    child, thread = stream_child(command, on_line)
    proc = psutil.Process(child.pid)
    samples: list[tuple[float, int]] = []
    while child.poll() is None:
        samples.append((time.perf_counter() - start, tree_rss(proc)))
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    thread.join(timeout=10)
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    steps = [(t, line) for t, line in lines if line.startswith("[")]
    phases = []
    for index, (t0, label) in enumerate(steps):
        t1 = steps[index + 1][0] if index + 1 < len(steps) else wall
        peak = max((rss for t, rss in samples if t0 <= t < t1), default=0)
        phases.append(
            {
                "phase": label,
                "start_s": round(t0, 2),
                "seconds": round(t1 - t0, 2),
                "peak_rss_bytes": peak,
            }
        )
    files = (
        {
            str(p.relative_to(bundle)): p.stat().st_size
            for p in sorted(bundle.rglob("*"))
            if p.is_file()
        }
        if bundle.exists()
        else {}
    )
    return ExportMeasurement(
        command=command,
        returncode=child.returncode,
        wall_s=wall,
        peak_rss_tree_bytes=max((rss for _, rss in samples), default=0),
        ru_maxrss_children_bytes=ru_children,
        phases=phases,
        bundle_files=files,
        log_tail=[line for _, line in lines[-15:]],
    )


# --------------------------------------------------------------------------- (b) inference


@dataclass(frozen=True)
class Case:
    name: str
    tower: str
    batch: int
    length: int = 0  # text tokens (0 for images)


CASES = (
    Case("image 1x512px", "vision", 1),
    Case("text 8x32", "text", 8, 32),
    Case("text 1x512", "text", 1, 512),
)


@dataclass
class Timing:
    """Per-run wall and CPU milliseconds after warm-up; the median wall time is reported."""

    runs_ms: list[float] = field(default_factory=list)
    own_cpu_ms: list[float] = field(default_factory=list)
    machine_busy_ms: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runs_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    def to_dict(self, threads: int) -> dict[str, Any]:
        wall = sum(self.runs_ms) or 1.0
        own = sum(self.own_cpu_ms)
        foreign = max(0.0, sum(self.machine_busy_ms) - own)
        return {
            "median_ms": round(self.median_ms, 2),
            "min_ms": round(min(self.runs_ms), 2),
            "max_ms": round(max(self.runs_ms), 2),
            "n": self.n,
            "runs_ms": [round(x, 2) for x in self.runs_ms],
            # Own CPU time per run: robust to other processes at 1 thread (no spinning pools).
            "cpu_median_ms": round(statistics.median(self.own_cpu_ms), 2),
            # CPU time of this process per wall second and thread (1.0 = both threads busy).
            "own_cpu_per_thread": round(own / wall / threads, 3),
            # CPUs' worth of time other processes used meanwhile (0 on an idle machine);
            # /proc/stat ticks are 10 ms, so it is left out for short totals.
            "foreign_cpus": round(foreign / wall, 3) if wall >= 2000 else None,
        }


def _busy_ms() -> float:
    """Machine-wide non-idle CPU time so far, in ms (all CPUs)."""
    t = psutil.cpu_times()
    return (sum(t) - t.idle - getattr(t, "iowait", 0.0)) * 1e3


def _timed(fn: Callable[[], Any], timing: Timing) -> None:
    busy0, cpu0, t0 = _busy_ms(), time.process_time(), time.perf_counter()
    fn()
    t1, cpu1, busy1 = time.perf_counter(), time.process_time(), _busy_ms()
    timing.runs_ms.append((t1 - t0) * 1e3)
    timing.own_cpu_ms.append((cpu1 - cpu0) * 1e3)
    timing.machine_busy_ms.append(busy1 - busy0)


def wait_for_quiet(
    max_foreign_cpus: float, max_wait_s: float, window_s: float = 2.0
) -> tuple[float, float]:
    """Wait (at most `max_wait_s`) until other processes use < `max_foreign_cpus` CPUs.

    Called while this process is idle, so all busy time seen is foreign. Returns the seconds
    waited and the last measured foreign load."""
    start = time.perf_counter()
    while True:
        busy0, t0 = _busy_ms(), time.perf_counter()
        time.sleep(window_s)
        foreign = (_busy_ms() - busy0) / ((time.perf_counter() - t0) * 1e3)
        waited = time.perf_counter() - start
        if foreign < max_foreign_cpus or waited >= max_wait_s:
            if foreign >= max_foreign_cpus:
                print(f"[quiet] still {foreign:.2f} foreign CPUs after {waited:.0f} s", flush=True)
            return waited, foreign


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    runs: int,
    budget_s: float,
    min_runs: int = 3,
) -> dict[str, Timing]:
    """Warm up each backend, then time them alternately (A B, B A, ...) so that load from other
    processes hits all alike; fewer runs (at least `min_runs`) if one round exceeds the budget."""
    round_s = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        round_s = time.perf_counter() - t0
    if warmup and budget_s > 0:
        runs = max(min_runs, min(runs, int(budget_s / max(round_s, 1e-6))))
    timings = {name: Timing() for name in fns}
    names = list(fns)
    for index in range(runs):
        for name in names if index % 2 == 0 else names[::-1]:
            _timed(fns[name], timings[name])
    return timings


def make_inputs(case: Case, vocab: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids over the full vocabulary (`<s> ... </s>`, no padding) or a normalised image."""
    rng = np.random.default_rng(seed)
    if case.tower == VISION.name:
        pixels = rng.standard_normal((case.batch, 3, image_size, image_size), dtype=np.float32)
        return {"pixel_values": pixels}
    ids = rng.integers(3, vocab, size=(case.batch, case.length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def rss_now() -> int:
    return psutil.Process().memory_info().rss


def _eager_run(module: Any, args: list[Any]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(*args).numpy()


def _ort_run(session: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    return session.run(None, feed)[0]


class CheckpointTowers:
    """Builds eager towers from the checkpoint with the exporter's own loader."""

    def __init__(self, checkpoint: Path) -> None:
        from clipedge.export.config import parse_config
        from clipedge.export.source import CheckpointSource

        raw = json.loads((checkpoint / "config.json").read_text())
        self.source = CheckpointSource(checkpoint, {"kind": "local"}, raw, parse_config(raw))
        self.config = self.source.config

    def build(self, tower: str) -> Any:
        from clipedge.export.weights import load_towers

        return load_towers(self.config, self.source.open_tensors(), [tower])[tower]


def torch_profile(module: Any, inputs: dict[str, np.ndarray], top: int = 10) -> list[dict]:
    """Self CPU time by aten op over one run (after warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    args = [torch.from_numpy(v) for v in inputs.values()]
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        module(*args)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "ms": round(e.self_cpu_time_total / 1e3, 2),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
        }
        for e in rows
    ]


def ort_options(
    threads: int,
    level: str = "all",
    spinning: bool | None = None,
    profile_prefix: Path | None = None,
    optimized_path: Path | None = None,
    config: dict[str, str] | None = None,
) -> Any:
    """SessionOptions for the CPU EP: `threads` intra-op threads, sequential execution."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[level]
    options.log_severity_level = 3
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        data_name = optimized_path.name + ".data"
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_name
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def ort_session(path: Path, options: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def summarise_ort_profile(trace: Path, runs: int, top: int = 10) -> list[dict]:
    """Kernel time by op type over the last `runs` model runs of an ORT profile (per run)."""
    events = json.loads(trace.read_text())
    windows = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[-runs:]
    totals: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(t0 <= event["ts"] <= t1 for t0, t1 in windows):
            continue
        op = event.get("args", {}).get("op_name", "?")
        totals[op] += event.get("dur", 0)
        calls[op] += 1
    total = sum(totals.values()) or 1.0
    rows = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return [
        {
            "op": op,
            "ms": round(us / runs / 1e3, 2),
            "share": round(us / total, 4),
            "calls": calls[op] // runs,
        }
        for op, us in rows
    ]


def count_ops(path: Path) -> dict[str, int]:
    """Op-type histogram of a graph (domain-qualified for non-default domains)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts = Counter(
        f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in model.graph.node
    )
    return dict(counts.most_common())


VARIANTS: dict[str, dict[str, Any]] = {
    "all (baseline)": {"level": "all"},
    "all, no spinning": {"level": "all", "spinning": False},
    "extended": {"level": "extended"},
    "basic": {"level": "basic"},
    "all, denormal-as-zero": {"level": "all", "config": {"session.set_denormal_as_zero": "1"}},
    "all, gelu approximation (changes numerics)": {
        "level": "all",
        "config": {"optimization.enable_gelu_approximation": "1"},
    },
}


@dataclass
class TowerResult:
    tower: str
    graph: str
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    load_s: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, float]] = field(default_factory=dict)
    fused_ops: dict[str, Any] = field(default_factory=dict)


def _load_backend(
    backend: str, tower: str, towers: CheckpointTowers, graph: Path, threads: int
) -> Any:
    if backend == "eager":
        return towers.build(tower)
    return ort_session(graph, ort_options(threads, "all"))


def _runner(backend: str, model: Any, feed: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
    if backend == "eager":
        import torch

        return partial(_eager_run, model, [torch.from_numpy(v) for v in feed.values()])
    return partial(_ort_run, model, feed)


def bench_tower(
    tower: str,
    cases: list[Case],
    towers: CheckpointTowers,
    bundle: Path,
    work: Path,
    args: argparse.Namespace,
) -> TowerResult:
    """Eager vs ORT for one tower; profiling and variants where ONNX misses the goal.

    By default both backends of the tower are in memory and timed alternately; with
    `--sequential` eager runs first and is freed before the ORT session is created.
    """
    graph = bundle / f"{tower}.onnx"
    result = TowerResult(tower, str(graph))
    cfg = towers.config
    inputs = {c.name: make_inputs(c, cfg.text.vocab_size, cfg.vision.image_size) for c in cases}
    budget = {
        c.name: args.image_budget_s if c.tower == VISION.name else args.text_budget_s for c in cases
    }
    runs = {c.name: args.image_runs if c.tower == VISION.name else args.runs for c in cases}
    groups = [["eager"], ["onnx"]] if args.sequential else [["eager", "onnx"]]
    outputs: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    torch_profiles: dict[str, list[dict]] = {}

    for group in groups:
        gc.collect()
        models: dict[str, Any] = {}
        for backend in group:
            base = rss_now()
            t0 = time.perf_counter()
            models[backend] = _load_backend(backend, tower, towers, graph, args.threads)
            result.load_s[backend] = round(time.perf_counter() - t0, 2)
            result.memory[f"{backend}_rss_delta"] = rss_now() - base
        for case in cases:
            print(f"[{'+'.join(group)}] {case.name} ...", flush=True)
            fns = {b: _runner(b, models[b], inputs[case.name]) for b in group}
            waited, idle_cpus = wait_for_quiet(args.quiet_cpus, args.quiet_wait_s)
            timings = time_interleaved(fns, args.warmup, runs[case.name], budget[case.name])
            entry = result.cases.setdefault(case.name, {})
            entry.setdefault("quiet_wait", {})["+".join(group)] = {
                "waited_s": round(waited, 1),
                "foreign_cpus_before": round(idle_cpus, 3),
            }
            for backend, timing in timings.items():
                outputs[case.name][backend] = fns[backend]()
                entry[backend] = timing.to_dict(args.threads)
                print(
                    f"[{backend}] {case.name}: {timing.median_ms:.1f} ms (n={timing.n}, "
                    f"foreign CPUs {_cpus(entry[backend]['foreign_cpus'])})",
                    flush=True,
                )
            del fns
            if "eager" in models and args.profile != "never":
                torch_profiles[case.name] = torch_profile(models["eager"], inputs[case.name])
        result.memory[f"{'+'.join(group)}_peak_rss"] = rss_now()
        del models
        gc.collect()

    below_goal = []
    for case in cases:
        entry = result.cases[case.name]
        ratio = entry["eager"]["median_ms"] / entry["onnx"]["median_ms"]
        entry["ratio_eager_over_onnx"] = round(ratio, 3)
        scores = cosines(outputs[case.name]["eager"], outputs[case.name]["onnx"])
        entry["cosine_eager_vs_onnx"] = float(scores.min())
        print(f"[ratio] {case.name}: eager/onnx {ratio:.2f}x", flush=True)
        if ratio < args.goal:
            below_goal.append(case)

    to_study = cases if args.profile == "always" else below_goal
    if args.profile == "never" or not to_study:
        return result
    for case in to_study:
        result.profiles.setdefault(case.name, {})["eager_top_ops"] = torch_profiles[case.name]
    profile_ort(graph, to_study, inputs, work, args, result)
    result.fused_ops = fused_ops(graph, work, args.threads)
    if args.variants:
        result.variants = time_variants(graph, to_study, inputs, args, runs, budget)
    return result


def profile_ort(
    graph: Path,
    cases: list[Case],
    inputs: dict[str, dict[str, np.ndarray]],
    work: Path,
    args: argparse.Namespace,
    result: TowerResult,
) -> None:
    """One profiling session per case (so traces are per case): kernel time by op type."""
    for case in cases:
        prefix = work / "profiles" / f"ort_{case.name.replace(' ', '_')}"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        session = ort_session(graph, ort_options(args.threads, "all", profile_prefix=prefix))
        feed = inputs[case.name]
        wait_for_quiet(args.quiet_cpus, args.quiet_wait_s)
        for _ in range(args.warmup):
            session.run(None, feed)
        profiled = 3
        for _ in range(profiled):
            session.run(None, feed)
        trace = Path(session.end_profiling())
        del session
        gc.collect()
        top = summarise_ort_profile(trace, profiled)
        result.profiles.setdefault(case.name, {})["onnx_top_ops"] = top
        result.profiles[case.name]["onnx_trace"] = str(trace)


def fused_ops(graph: Path, work: Path, threads: int) -> dict[str, Any]:
    """Save the ORT_ENABLE_ALL-optimised graph and compare op counts with the exported one."""
    out = work / "optimized" / f"{graph.stem}.ort-optimized.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    session = ort_session(graph, ort_options(threads, "all", optimized_path=out))
    del session
    gc.collect()
    summary = {"exported": count_ops(graph), "ort_optimized": count_ops(out), "path": str(out)}
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()  # weights are not needed to count ops; keep the disk use small
    return summary


def time_variants(
    graph: Path,
    cases: list[Case],
    inputs: dict[str, dict[str, np.ndarray]],
    args: argparse.Namespace,
    runs: dict[str, int],
    budget: dict[str, float],
) -> dict[str, dict[str, float]]:
    """Median ms per ORT session-option variant (one session in memory at a time)."""
    table: dict[str, dict[str, float]] = {}
    for name, spec in VARIANTS.items():
        session = ort_session(graph, ort_options(args.threads, **spec))
        row = {}
        for case in cases:
            feed = inputs[case.name]
            wait_for_quiet(args.quiet_cpus, args.quiet_wait_s)
            timing = time_interleaved(
                {"onnx": partial(_ort_run, session, feed)},
                args.warmup,
                runs[case.name],
                budget[case.name],
            )["onnx"]
            row[case.name] = round(timing.median_ms, 2)
        print(f"[variant] {name}: {row}", flush=True)
        table[name] = row
        del session
        gc.collect()
    return table


# --------------------------------------------------------------------------- report


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpus(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gb(value: int) -> str:
    return f"{value / GB:.2f} GB"


def markdown(results: dict[str, Any]) -> str:
    """Tables for the export and the eager-vs-ONNX timings."""
    lines = []
    export = results.get("export")
    if export:
        lines += [
            "### Export",
            "",
            "| wall | peak RSS (tree, 0.2 s poll) | ru_maxrss children | bundle | rc |",
            "|---|---|---|---|---|",
            f"| {export['wall_s']:.1f} s | {_gb(export['peak_rss_tree_bytes'])} | "
            f"{_gb(export['ru_maxrss_children_bytes'])} | {_gb(export['bundle_bytes'])} | "
            f"{export['returncode']} |",
            "",
            "| phase | seconds | peak RSS |",
            "|---|---|---|",
        ]
        lines += [
            f"| {p['phase'][:70]} | {p['seconds']:.1f} | {_gb(p['peak_rss_bytes'])} |"
            for p in export["phases"]
            if p["seconds"] >= 0.5 or p["peak_rss_bytes"]
        ]
        lines += ["", "| bundle file | size |", "|---|---|"]
        lines += [
            f"| {name} | {size / 1e6:.1f} MB |" for name, size in export["bundle_files"].items()
        ]
        lines.append("")
    inference = results.get("inference")
    if inference:
        lines += [
            f"### fp32 inference, {results['threads']} threads",
            "",
            "| case | eager ms (n) | onnx ms (n) | eager/onnx | cosine | foreign CPUs e/o "
            "| CPU-time eager/onnx |",
            "|---|---|---|---|---|---|---|",
        ]
        for tower in inference.values():
            for name, case in tower["cases"].items():
                e, o = case["eager"], case["onnx"]
                lines.append(
                    f"| {name} | {e['median_ms']:.1f} ({e['n']}) | {o['median_ms']:.1f} "
                    f"({o['n']}) | {case['ratio_eager_over_onnx']:.2f}x | "
                    f"{case['cosine_eager_vs_onnx']:.6f} | "
                    f"{_cpus(e['foreign_cpus'])}/{_cpus(o['foreign_cpus'])} | "
                    f"{e['cpu_median_ms'] / o['cpu_median_ms']:.2f}x |"
                )
        for tower in inference.values():
            for name, prof in tower["profiles"].items():
                for key in ("eager_top_ops", "onnx_top_ops"):
                    if key in prof:
                        lines += ["", f"{name}, {key.replace('_', ' ')} (ms per run, share):"]
                        lines += [
                            f"- {r['op']}: {r['ms']:.1f} ms ({100 * r['share']:.1f}%, "
                            f"{r['calls']} calls)"
                            for r in prof[key]
                        ]
            if tower["variants"]:
                cols = list(next(iter(tower["variants"].values())))
                lines += [
                    "",
                    f"ORT variants, {tower['tower']} (median ms):",
                    "",
                    "| variant | " + " | ".join(cols) + " |",
                    "|---|" + "---|" * len(cols),
                ]
                for name, row in tower["variants"].items():
                    lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |")
            if tower["fused_ops"]:
                lines += [
                    "",
                    f"ORT-optimised {tower['tower']} graph ops: "
                    + ", ".join(f"{k} {v}" for k, v in tower["fused_ops"]["ort_optimized"].items()),
                ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="full-size checkpoint dir")
    parser.add_argument("--work", type=Path, required=True, help="scratch dir (bundle, profiles)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--skip-export", action="store_true", help="reuse WORK/bundle")
    parser.add_argument("--skip-inference", action="store_true", help="only measure the export")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per text case")
    parser.add_argument("--image-runs", type=int, default=5, help="timed runs for the image")
    parser.add_argument("--text-budget-s", type=float, default=30.0, help="time cap per case")
    parser.add_argument("--image-budget-s", type=float, default=60.0, help="time cap per case")
    parser.add_argument(
        "--quiet-cpus",
        type=float,
        default=0.3,
        help="before each case, wait until other processes use fewer CPUs than this",
    )
    parser.add_argument(
        "--quiet-wait-s", type=float, default=300.0, help="longest wait for a quiet machine"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="one backend in memory at a time (lower peak RSS, no interleaving)",
    )
    parser.add_argument("--goal", type=float, default=1.2, help="wanted eager/onnx ratio")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="profile cases below --goal (auto), every case, or none",
    )
    parser.add_argument(
        "--no-variants",
        dest="variants",
        action="store_false",
        help="skip timing ORT session-option variants when profiling",
    )
    parser.add_argument(
        "--cases", default=",".join(c.name for c in CASES), help="comma list of case names"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.work / "bundle"
    results: dict[str, Any] = {
        "machine": machine_info(torch_threads()),
        "threads": args.threads,
        "checkpoint": str(args.checkpoint),
        "bundle": str(bundle),
    }

    if not args.skip_export:
        print(f"[bench] exporting {args.checkpoint} -> {bundle}", flush=True)
        measured = run_export(args.checkpoint, bundle)
        results["export"] = {**asdict(measured), "bundle_bytes": measured.bundle_bytes}
        if measured.returncode != 0:
            print(markdown(results))
            write_json(args.out, results)
            print(f"export failed (rc {measured.returncode})", file=sys.stderr)
            return 1

    if not args.skip_inference:
        wanted = {name.strip() for name in args.cases.split(",")}
        towers = CheckpointTowers(args.checkpoint)
        inference = {}
        for tower in ("vision", "text"):
            cases = [c for c in CASES if c.tower == tower and c.name in wanted]
            if cases:
                inference[tower] = asdict(
                    bench_tower(tower, cases, towers, bundle, args.work, args)
                )
                args.out.write_text(json.dumps({**results, "inference": inference}, indent=2))
        results["inference"] = inference
    results["bench_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    report = markdown(results)
    print(report)
    write_json(args.out, results)
    args.out.with_suffix(".md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
