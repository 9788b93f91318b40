"""The fastest CPU path for jina-clip-v2: every engine side by side on the full-size towers.

Engines: PyTorch eager fp32, PyTorch torch.compile + bf16 autocast (the peer; its per-shape
compile is reported apart), onnxruntime fp32 and its int8 forms (`calibration.cpu_int8`),
OpenVINO bf16 and OpenVINO int8 (NNCF). Cases, batch as given: one 512 px image, 8 texts x 32
tokens, 1 text x 512 tokens. For each engine: the median of n timed runs after a warm-up
(n >= 5, fewer for slow engines: the number is reported), start-up time, the first call per
shape (compile for torch.compile), and cosine to onnxruntime fp32 on held-out inputs that
calibration never saw.

Each engine and tower runs in its own child process, one at a time, so memory stays that of
one engine (< 12 GB) and a crash costs one row. Quantised graphs are built once into --work.

    flock /tmp/clipedge-heavy.lock .venv/bin/python -m benchmarks.cpu \
        --bundle /tmp/clipedge-bench/work/bundle --checkpoint /tmp/clipedge-bench/checkpoint \
        --work /tmp/clipedge-bench/cpu --out /tmp/clipedge-bench/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clipedge.towers import TEXT, VISION

from .common import (
    FIXTURE,
    Feed,
    Runner,
    cosines,
    median_ms,
    run_module,
    time_calls,
    torch_inputs,
    torch_tower,
)
from .machine import describe, machine_info

CASES = {
    "image_1x512px": ("vision", 1, 0),
    "text_8x32": ("text", 8, 32),
    "text_1x512": ("text", 1, 512),
}
TOWER_CASES = {
    tower: [c for c, (t, _, _) in CASES.items() if t == tower] for tower in ("text", "vision")
}
GOAL_S = {"image_1x512px": 0.6, "text_8x32": 0.08, "text_1x512": 0.18}
# benchmarks.floor's floors: matrix work at the int8 peak; weights at the int8 peak and attention
# at the time of OpenVINO's fused attention kernel alone.
FLOORS = {
    "floor_int8_s": "int8 floor (benchmarks.floor)",
    "floor_kernels_s": "floor with attention's kernel",
}
ENGINES = {  # run in this order (the reference first), so a cut-short run has the key rows
    "ort-fp32": "onnxruntime CPU EP, fp32 graph (reference)",
    "ov-bf16": "OpenVINO CPU, bf16 inference precision, fp32 ONNX read directly",
    "ort-dynamic-int8": "onnxruntime, dynamic int8 (MatMul + embedding Gather, per channel)",
    "ov-int8": "OpenVINO CPU, NNCF int8 (attention bf16) + bf16, the whole tower (no search)",
    "torch-compile-bf16": "PyTorch torch.compile (inductor, freezing) + bf16 autocast",
    "ort-qdq-u8": "onnxruntime, static QDQ u8 activations on weight MatMuls",
    "ort-qoperator-u8": "onnxruntime, static QOperator (QLinearMatMul) on weight MatMuls",
    "torch-eager-fp32": "PyTorch eager, fp32",
}
REFERENCE = "ort-fp32"
# Batch users' rate (items per second) at these batch sizes; texts of 32 tokens. OpenVINO is
# measured in both of its modes: one request on every core, and streams run side by side.
RATE_BATCHES = (8, 32)
RATE_MODES = {"ov-int8": ("latency", "throughput")}
RATE_RUNS = 2  # timed calls per batch size after one warm-up (a batch of 32 images is long)
MIN_RUNS, MAX_RUNS, TIME_BUDGET_S = 5, 12, 30.0
SLOW_MIN_RUNS = 2  # engines slower than TIME_BUDGET_S / MIN_RUNS per call

FIXTURE_IMAGES = FIXTURE / "expected" / "inputs"
CALIBRATION_IMAGES = [
    "coffee.png",
    "camera.png",
    "horse.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "motorcycle_left.png",
    "brick.png",
    "page.png",
]
EVAL_IMAGES = ["astronaut.png", "chelsea.png", "rocket.jpg"]
SENTENCES = [
    "A cat sleeps on a red sofa next to an open window.",
    "Two children build a sandcastle while the tide comes in.",
    "The quarterly report shows revenue growth in every region except Europe.",
    "Ein Hund rennt über eine nasse Wiese im Morgennebel.",
    "Le marché du samedi vend des fromages, du pain et des fleurs.",
    "La receta lleva tomates maduros, ajo, aceite de oliva y sal marina.",
    "Поезд прибыл на станцию с опозданием на двадцать минут.",
    "東京の夜景は高層ビルの明かりでとても美しい。",
    "一只小鸟站在雪地里的树枝上。",
    "Il museo espone dipinti del Rinascimento e sculture moderne.",
    "Represent a photo of a mountain lake at sunset with pine trees.",
    "How do I reset the password of my wireless router?",
    "De fiets staat tegen de muur van het oude station.",
    "O gato preto dorme ao sol no telhado da casa.",
    "Kahve fincanı masanın kenarında duruyor.",
    "The recipe calls for two cups of flour and a pinch of salt.",
]


# --------------------------------------------------------------------------- inputs


def _image_paths(names: list[str]) -> list[Path]:
    import skimage

    root = Path(skimage.__file__).parent / "data"
    return [root / name for name in names]


def _texts(rng: random.Random, count: int, words: int) -> list[str]:
    """`count` texts of about `words` words, drawn from SENTENCES in a seeded order."""
    texts = []
    for _ in range(count):
        parts: list[str] = []
        while sum(len(p.split()) for p in parts) < words:
            parts.append(rng.choice(SENTENCES))
        texts.append(" ".join(parts))
    return texts


def _text_feed(model: Any, texts: list[str], length: int) -> Feed:
    """Texts cut to exactly `length` tokens (all are longer): shape [len(texts), length]."""
    tower = model.tower(TEXT.name)
    prepared = tower.prepare(texts, max_length=length)
    assert all(len(ids) == length for ids in prepared.token_ids), "a text is shorter than its case"
    return tower.feeds(prepared.token_ids)


def case_inputs(bundle: Path) -> dict[str, list[Feed]]:
    """Per case: the feeds to score, the first one also timed. None of them is calibration data."""
    import clipedge

    model = clipedge.load(bundle, backend="cpu")
    rng = random.Random(1)
    images = _image_paths(EVAL_IMAGES) + [FIXTURE_IMAGES / "img3_large_1024x768.jpg"]
    return {
        "image_1x512px": [
            {"pixel_values": model.tower(VISION.name).prepare([p]).pixels} for p in images
        ],
        "text_8x32": [_text_feed(model, _texts(rng, 8, 40), 32) for _ in range(3)],
        "text_1x512": [_text_feed(model, _texts(rng, 1, 600), 512) for _ in range(3)],
    }


def calibration_feeds(bundle: Path, tower: str) -> list[Feed]:
    """Calibration inputs in the production form (task prompts, varied lengths, batch 8 / 4)."""
    import clipedge
    from clipedge.calibration.data import image_feeds, text_feeds

    model = clipedge.load(bundle, backend="cpu")
    if tower == VISION.name:
        return list(image_feeds(model, _image_paths(CALIBRATION_IMAGES), batch_size=2))
    rng = random.Random(2)
    texts = [t for words in (8, 30, 120, 300) for t in _texts(rng, 4, words)]
    return list(text_feeds(model, texts, batch_size=8))


def flops(checkpoint: Path) -> dict[str, float]:
    """Multiply-add FLOPs per case: weight MatMuls plus attention scores and context."""
    config = json.loads((checkpoint / "config.json").read_text())
    from clipedge.export.config import parse_config

    cfg = parse_config(config)
    text, vision = cfg.text, cfg.vision
    text_params = text.num_layers * (
        4 * text.hidden_size**2 + 2 * text.hidden_size * text.intermediate_size
    )
    vision_params = vision.layers * (4 * vision.width**2 + 3 * vision.width * vision.mlp_hidden)
    tokens = vision.grid_size**2 + 1

    def attention(layers: int, batch: int, length: int, width: int) -> float:
        return 4.0 * layers * batch * length * length * width

    return {
        "image_1x512px": 2.0 * vision_params * tokens
        + attention(vision.layers, 1, tokens, vision.width),
        "text_8x32": 2.0 * text_params * 256 + attention(text.num_layers, 8, 32, text.hidden_size),
        "text_1x512": 2.0 * text_params * 512
        + attention(text.num_layers, 1, 512, text.hidden_size),
    }


# --------------------------------------------------------------------------- engines


# Engines that are a bundle precision: built with that precision's own converter, so the
# benchmark measures exactly what `clipedge calibrate` ships.
SHIPPED = {"ort-dynamic-int8": "int8-cpu", "ov-int8": "int8-ov"}


def prepare_graph(engine: str, tower: str, bundle: Path, work: Path) -> tuple[Path, float | None]:
    """The graph an ORT/OpenVINO engine loads, built into `work` on first use (build seconds)."""
    from clipedge.calibration import cpu_int8
    from clipedge.calibration.precisions import PRECISIONS, Conversion

    source = bundle / f"{tower}.onnx"
    if engine in ("ort-fp32", "ov-bf16"):
        return source, None
    suffix = ".xml" if engine.startswith("ov") else ".onnx"
    target = work / "graphs" / engine / f"{tower}{suffix}"
    if target.is_file():
        return target, None
    start = time.perf_counter()
    feeds = None if engine == "ort-dynamic-int8" else calibration_feeds(bundle, tower)
    if engine in SHIPPED:
        PRECISIONS[SHIPPED[engine]].make_converter(source, feeds or [], Conversion())([], target)
    else:
        mode = {"ort-qdq-u8": "qdq_u8", "ort-qoperator-u8": "qoperator"}
        cpu_int8.quantize_cpu(source, target, mode[engine], feeds)
    return target, time.perf_counter() - start


def load_engine(
    engine: str, tower: str, args: argparse.Namespace, mode: str = "latency"
) -> tuple[Runner, dict[str, Any]]:
    """A runner for one engine and tower, and what loading it cost."""
    if engine.startswith("torch"):
        return _load_torch(engine, tower, args)
    graph, build_s = prepare_graph(engine, tower, args.bundle, args.work)
    info: dict[str, Any] = {"graph": str(graph), "build_s": build_s}
    start = time.perf_counter()
    if engine.startswith("ov"):
        from clipedge.engine.openvino_backend import OpenVinoOptions, OpenVinoSession

        cache = args.work / "ov-cache" / engine / tower
        shutil.rmtree(cache, ignore_errors=True)
        options = OpenVinoOptions(threads=args.threads, cache_dir=cache, mode=mode)
        session = OpenVinoSession(graph, options)
        info["startup_s"] = time.perf_counter() - start
        del session
        start = time.perf_counter()
        session = OpenVinoSession(graph, options)
        info["startup_cached_s"] = time.perf_counter() - start
        info["streams"] = session.streams
        info["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    else:
        from clipedge.engine.onnxruntime_backend import OnnxruntimeOptions, OrtSession

        session = OrtSession(graph, "cpu", OnnxruntimeOptions(threads=args.threads))
        info["startup_s"] = time.perf_counter() - start
    info["provider"] = session.provider
    return session.run, info


def _load_torch(engine: str, tower: str, args: argparse.Namespace) -> tuple[Runner, dict[str, Any]]:
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    module = torch_tower(args.checkpoint, tower)
    info: dict[str, Any] = {
        "startup_s": time.perf_counter() - start,
        "provider": f"torch {torch.__version__}",
    }
    autocast = engine == "torch-compile-bf16"
    if autocast:
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant-folds and prepacks weights: the CPU inference setting
        module = torch.compile(module, dynamic=False)

    def run(feed: Feed) -> np.ndarray:
        tensors = [torch.from_numpy(array) for array in torch_inputs(feed)]
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            return module(*tensors).float().numpy()

    return run, info


def time_case(run: Runner, feed: Feed) -> dict[str, Any]:
    """First call (per-shape compile included), then a warm-up and the median of n runs."""
    timing, _ = time_calls(lambda: run(feed), MIN_RUNS, MAX_RUNS, TIME_BUDGET_S, SLOW_MIN_RUNS)
    return timing


def rate_feeds(bundle: Path, tower: str, images: list[Feed]) -> dict[int, Feed]:
    """Per batch size, held-out images (`images`, cycled) or 32-token texts, built once."""
    import clipedge

    model = clipedge.load(bundle, backend="cpu") if tower == TEXT.name else None
    feeds = {}
    for batch in (1, *RATE_BATCHES):
        if model is None:
            pixels = [images[i % len(images)]["pixel_values"] for i in range(batch)]
            feeds[batch] = {"pixel_values": np.concatenate(pixels)}
        else:
            feeds[batch] = _text_feed(model, _texts(random.Random(3), batch, 40), 32)
    return feeds


def measure_rates(
    engine: str, tower: str, args: argparse.Namespace, images: list[Feed]
) -> dict[str, Any]:
    """Items per second per mode and batch size, against the same engine's batch-1 rate."""
    rates: dict[str, Any] = {}
    feeds = rate_feeds(args.bundle, tower, images)
    for mode in RATE_MODES[engine]:
        run, info = load_engine(engine, tower, args, mode)
        rates[mode] = {"streams": info.get("streams", 1)}
        for batch, feed in feeds.items():
            runs = RATE_RUNS if batch > 1 else MIN_RUNS
            ms = median_ms(partial(run, feed), runs)
            rates[mode][str(batch)] = {"items_per_s": 1000 * batch / ms, "median_ms": ms, "n": runs}
        del run
    return rates


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One engine on one tower: load, time each case, score against the reference outputs."""
    engine, tower = args.engine, args.tower
    inputs = case_inputs(args.bundle)
    run, info = load_engine(engine, tower, args)
    result: dict[str, Any] = {**info, "cases": {}}
    outputs = {}
    for case in TOWER_CASES[tower]:
        result["cases"][case] = time_case(run, inputs[case][0])
        outputs[case] = np.concatenate([run(feed) for feed in inputs[case]])
    reference_file = args.work / f"reference-{tower}.npz"
    if engine == REFERENCE:
        np.savez(reference_file, **outputs)
    reference = np.load(reference_file)
    scores = np.concatenate([cosines(outputs[c], reference[c]) for c in outputs])
    result["cosine_mean"], result["cosine_min"] = float(scores.mean()), float(scores.min())
    if engine in RATE_MODES and args.rates:
        del run
        result["rates"] = measure_rates(engine, tower, args, inputs["image_1x512px"])
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return result


# --------------------------------------------------------------------------- orchestration


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every engine x tower in a child process, the reference first."""
    engines = [REFERENCE, *[e for e in args.engines if e != REFERENCE]]
    results: dict[str, Any] = {
        "machine": machine_info(args.threads),
        "flops": flops(args.checkpoint),
        "goal_s": GOAL_S,
        "engines": {},
    }
    args.work.mkdir(parents=True, exist_ok=True)
    for engine in engines:
        results["engines"][engine] = {"description": ENGINES[engine]}
        for tower in args.towers:
            out = args.work / f"child-{engine}-{tower}.json"
            command = [
                "--child",
                "--engine",
                engine,
                "--tower",
                tower,
                "--bundle",
                str(args.bundle),
                "--checkpoint",
                str(args.checkpoint),
                "--work",
                str(args.work),
                "--threads",
                str(args.threads),
                "--out",
                str(out),
                *(["--rates"] if args.rates else []),
            ]
            print(f"[{engine}] {tower} ...", flush=True)
            start = time.perf_counter()
            proc = run_module(__spec__.name, command)
            if proc.returncode != 0:
                killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
                tail = [f"exit status {proc.returncode}{killed}"]
                tail += (proc.stdout + proc.stderr).strip().splitlines()[-15:]
                results["engines"][engine][tower] = {"error": tail}
                print(f"[{engine}] {tower} FAILED:\n  " + "\n  ".join(tail), flush=True)
                continue
            child = json.loads(out.read_text())
            child["wall_s"] = time.perf_counter() - start
            results["engines"][engine][tower] = child
            cases = ", ".join(
                f"{c} {v['median_ms']:.0f} ms (n={v['n']})" for c, v in child["cases"].items()
            )
            print(f"[{engine}] {tower}: {cases}; cosine min {child['cosine_min']:.5f}", flush=True)
            args.out.write_text(json.dumps(results, indent=2))
    return results


def _cell_case(result: dict[str, Any], case: str) -> str:
    tower = CASES[case][0]
    entry = result.get(tower, {})
    if "error" in entry:
        return "failed"
    timing = entry.get("cases", {}).get(case)
    if timing is None:
        return "-"
    mark = " ✓" if timing["median_ms"] <= 1000 * GOAL_S[case] else ""

    def fmt(ms: float) -> str:
        return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"

    # The minimum beside the median: on a shared machine it is the least disturbed run.
    low = min(timing["times_ms"])
    return f"{fmt(timing['median_ms'])} (min {fmt(low)}, n={timing['n']}){mark}"


def _cell_tower(result: dict[str, Any], tower: str, render: Callable[[dict[str, Any]], str]) -> str:
    entry = result.get(tower)
    return "-" if not entry or "error" in entry else render(entry)


def markdown(results: dict[str, Any], floor: dict | None = None) -> str:
    """The engines table; `floor` (benchmarks.floor JSON) adds this machine's int8 floor."""
    lines = [
        describe(results["machine"]),
        "",
        "| engine | image 1x512px ms | text 8x32 ms | text 1x512 ms | start-up s (text / vision) "
        "| first call s (per shape) | cosine text mean / min | cosine vision mean / min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for engine, result in results["engines"].items():
        startup = " / ".join(
            _cell_tower(
                result,
                t,
                lambda e: (
                    f"{e['startup_s']:.1f}"
                    + (f" ({e['startup_cached_s']:.1f} cached)" if "startup_cached_s" in e else "")
                ),
            )
            for t in ("text", "vision")
        )
        first = ", ".join(
            f"{result[t]['cases'][c]['first_call_s']:.1f}"
            for c, (t, _, _) in CASES.items()
            if "cases" in result.get(t, {})
        )
        cos = [
            _cell_tower(result, t, lambda e: f"{e['cosine_mean']:.4f} / {e['cosine_min']:.4f}")
            for t in ("text", "vision")
        ]
        cells = [_cell_case(result, c) for c in CASES]
        lines.append(
            f"| {engine} | {' | '.join(cells)} | {startup} | {first or '-'} | {cos[0]} | {cos[1]} |"
        )
    goal = " | ".join(f"{1000 * results['goal_s'][c]:.0f}" for c in CASES)
    gflop = " | ".join(f"{results['flops'][c] / 1e9:.0f} GFLOP" for c in CASES)
    lines.append(f"| goal | {goal} | | | | |")
    for key, label in FLOORS.items():
        if floor and all(key in floor["cases"][c] for c in CASES):
            floors = " | ".join(f"{1000 * floor['cases'][c][key]:.0f}" for c in CASES)
            lines.append(f"| {label} | {floors} | | | | |")
    lines += [
        f"| work per case | {gflop} | | | | |",
        "",
        "Times: median (minimum, number of timed runs) after a warm-up; ✓ meets the goal. "
        "First call: the first run at each shape (torch.compile compiles there).",
    ]
    return "\n".join(lines) + rates_markdown(results)


def rates_markdown(results: dict[str, Any]) -> str:
    """Items per second per engine, mode and batch size (when measured with --rates)."""
    lines = []
    for engine, result in results["engines"].items():
        for tower in ("vision", "text"):
            for mode, rates in result.get(tower, {}).get("rates", {}).items():
                cells = [f"{rates[b]['items_per_s']:.2f}" for b in ("1", *map(str, RATE_BATCHES))]
                lines.append(
                    f"| {engine} | {tower} | {mode} ({rates['streams']} stream(s)) | "
                    + " | ".join(cells)
                    + " |"
                )
    if not lines:
        return ""
    batches = " | ".join(f"batch {b}" for b in (1, *RATE_BATCHES))
    header = [
        "\n\nItems per second:\n",
        f"| engine | tower | mode | {batches} |",
        "| --- | --- | --- |" + " ---: |" * (1 + len(RATE_BATCHES)),
    ]
    return "\n".join(header + lines)


def render_charts(results: dict[str, Any], floor: dict | None, folder: Path) -> list[Path]:
    """One PNG per case: seconds per engine (cosine >= 0.99 only), the floors as lines."""
    from .charts import Line, bar_chart

    machine = results["machine"]
    subtitle = f"{machine['cpu']}, {machine['threads_used']} threads, batch as in the case"
    written = []
    for case, (tower, _, _) in CASES.items():
        labels, values = [], []
        for engine, result in results["engines"].items():
            entry = result.get(tower, {})
            timing = entry.get("cases", {}).get(case)
            if timing and entry.get("cosine_min", 0) >= 0.99:
                labels.append(engine)
                values.append(timing["median_ms"] / 1000)
        if not values:
            continue
        lines = [Line(results["goal_s"][case], "goal")]
        if floor:
            row = floor["cases"][case]
            lines[:0] = [Line(row[key], label) for key, label in FLOORS.items() if key in row]
        written.append(
            bar_chart(
                folder / f"cpu-{case}.png",
                f"{case}: seconds per call",
                labels,
                values,
                "s",
                lines,
                subtitle,
            )
        )
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="full-size fp32 bundle")
    parser.add_argument("--checkpoint", type=Path, help="its checkpoint (for the torch towers)")
    parser.add_argument("--work", type=Path, help="quantised graphs, caches, reference outputs")
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument("--render", type=Path, help="print the table of an earlier --out and stop")
    parser.add_argument("--charts", type=Path, help="with --render: write PNG charts here")
    parser.add_argument("--floor", type=Path, help="benchmarks.floor JSON: the floor in charts")
    parser.add_argument(
        "--rates", action="store_true", help=f"also items/s at batch {RATE_BATCHES} per mode"
    )
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument(
        "--towers", nargs="+", choices=["text", "vision"], default=["text", "vision"]
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--tower", choices=["text", "vision"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        floor = json.loads(args.floor.read_text()) if args.floor else None
        print(markdown(results, floor))
        if args.charts:
            for path in render_charts(results, floor, args.charts):
                print(f"wrote {path}")
        return
    if None in (args.bundle, args.checkpoint, args.work, args.out):
        raise SystemExit("--bundle, --checkpoint, --work and --out are required")
    if args.child:
        args.out.write_text(json.dumps(run_child(args), indent=2))
        return
    results = run_all(args)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
