"""The GPU check's summary: steps, tests, verify and the benchmark in one markdown file.

Called by scripts/gpu_check.sh after every step (so a run cut short still leaves one), with
the standard library only. Reads from WORK: steps.tsv (name, result, seconds, start, end,
note), logs/verify.log and bench-<engine>-<tower>.json; from OUT:
pytest.log and gpu_mem.csv (nvidia-smi samples). Writes to OUT: summary.md, and
bench_gpu.json / bench_gpu.md, the benchmark calls (one per engine and tower) merged.

    python scripts/device/summary.py --work WORK --out OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any


def read_steps(work: Path) -> list[dict[str, Any]]:
    steps = []
    path = work / "steps.tsv"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        name, result, seconds, start, end, note = (line.split("\t") + [""] * 6)[:6]
        steps.append(
            {
                "name": name,
                "result": result,
                "seconds": float(seconds or 0),
                "start": float(start or 0),
                "end": float(end or 0),
                "note": note,
            }
        )
    return sorted(steps, key=lambda s: s["start"])


def read_memory(out: Path) -> list[tuple[float, float, float]]:
    """(time, MiB used, MiB total) per nvidia-smi sample."""
    path = out / "gpu_mem.csv"
    if not path.is_file():
        return []
    samples = []
    for row in csv.reader(path.read_text().splitlines()):
        try:
            stamp = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((stamp, float(row[1]), float(row[2])))
        except (ValueError, IndexError):
            continue  # the header, or a line cut short
    return samples


def peak(samples: list[tuple[float, float, float]], start: float, end: float) -> float | None:
    inside = [used for stamp, used, _ in samples if start <= stamp <= end]
    return max(inside) if inside else None


def merge_bench(work: Path, order: list[str]) -> dict[str, Any] | None:
    files = sorted(work.glob("bench-*.json"))
    if not files:
        return None
    rank = {name: i for i, name in enumerate(order)}
    files.sort(key=lambda f: rank.get(f.stem, len(rank)))
    merged: dict[str, Any] = {"engines": {}}
    for file in files:
        data = json.loads(file.read_text())
        merged.setdefault("machine", data.get("machine"))
        merged.setdefault("text_length", data.get("text_length"))
        for engine, rows in data.get("engines", {}).items():
            merged["engines"].setdefault(engine, []).extend(rows)
    return merged


def _reason(row: dict[str, Any]) -> str:
    return " ".join(str(row.get("skipped") or row.get("error") or "").split())[:160]


def bench_tables(results: dict[str, Any]) -> str:
    """Items/s side by side (tower x batch rows, engine / precision columns), then every row."""
    measured: dict[tuple[str, str], dict[tuple[str, int], float]] = {}
    for engine, rows in results["engines"].items():
        for row in rows:
            if "items_per_s" in row:
                column = measured.setdefault((engine, row["precision"]), {})
                column[(row["tower"], row["batch"])] = row["items_per_s"]
    lines = []
    if measured:
        columns = list(measured)
        keys = sorted({key for column in measured.values() for key in column})
        lines += [
            f"Items per second (texts of {results.get('text_length')} tokens; images at the "
            "tower's size):",
            "",
            "| tower | batch | "
            + " | ".join(e if e.endswith(p) else f"{e} {p}" for e, p in columns)
            + " |",
            "| --- | ---: |" + " ---: |" * len(columns),
        ]
        for tower, batch in keys:
            cells = [str(measured[c].get((tower, batch), "")) for c in columns]
            lines.append(f"| {tower} | {batch} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "| engine | tower | precision | batch | median ms | items/s | first call s | runs "
        "| cos min vs ort-cuda fp32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for engine, rows in results["engines"].items():
        for row in rows:
            head = f"| {engine} | {row.get('tower')} | {row.get('precision')} |"
            if "skipped" in row:
                lines.append(f"{head} | skipped: {_reason(row)} | | | | |")
            elif "error" in row:
                lines.append(f"{head} {row['batch']} | error: {_reason(row)} | | | | |")
            else:
                lines.append(
                    f"{head} {row['batch']} | {row['median_ms']} | {row['items_per_s']} | "
                    f"{row['first_call_s']} | {row['n']} | {row.get('cosine_min')} |"
                )
    return "\n".join(lines)


def tail_lines(path: Path, keep: tuple[str, ...], last: int = 30) -> list[str]:
    """The lines of `path` that start with one of `keep`, or are pytest's count line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    counts = re.compile(r"^\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")
    return [line for line in lines if line.startswith(keep) or counts.match(line)][-last:]


def verify_table(work: Path) -> list[str]:
    path = work / "logs" / "verify.log"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("tower ")), None)
    return lines[start:] if start is not None else lines[-30:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    steps = read_steps(args.work)
    samples = read_memory(args.out)
    lines = [f"# GPU check summary ({datetime.now().isoformat(timespec='seconds')})", ""]
    if samples:
        idle = min(used for _, used, _ in samples)
        lines.append(
            f"GPU memory: {idle:.0f} MiB used when idle, {max(s[1] for s in samples):.0f} MiB "
            f"at the peak, of {samples[-1][2]:.0f} MiB (nvidia-smi, every 0.5 s; a step's peak "
            "includes whatever ran beside it, e.g. the background GPU tests)."
        )
    else:
        lines.append("GPU memory: no nvidia-smi samples (no GPU here, or no nvidia-smi).")
    total = sum(step["seconds"] for step in steps if step["name"] != "gpu-tests")
    lines += [
        "",
        f"## Steps ({total:.0f} s in the foreground; gpu-tests ran beside them)",
        "",
        "| step | result | seconds | GPU memory peak MiB | note |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for step in steps:
        memory = peak(samples, step["start"], step["end"])
        lines.append(
            f"| {step['name']} | {step['result']} | {step['seconds']:.1f} | "
            f"{'' if memory is None else f'{memory:.0f}'} | {step['note']} |"
        )

    tests = tail_lines(args.out / "pytest.log", ("PASSED", "FAILED", "SKIPPED", "ERROR", "=", "E "))
    lines += ["", "## tests/test_gpu.py", "", "```", *tests, "```"]
    lines += ["", "## clipedge verify", "", "```", *verify_table(args.work), "```"]

    bench = merge_bench(args.work, [step["name"] for step in steps])
    lines += ["", "## Benchmark", ""]
    if bench is None:
        lines.append("No benchmark results yet.")
    else:
        table = bench_tables(bench)
        (args.out / "bench_gpu.json").write_text(json.dumps(bench, indent=2) + "\n")
        (args.out / "bench_gpu.md").write_text(table + "\n")
        memory_rows = []
        for step in steps:
            if step["name"].startswith("bench-"):
                memory = peak(samples, step["start"], step["end"])
                shown = "" if memory is None else f"{memory:.0f}"
                memory_rows.append(f"| {step['name'][6:]} | {shown} | {step['result']} |")
        lines += [
            table,
            "",
            "GPU memory per call (peak used on the whole GPU while it ran):",
            "",
            "| engine, tower | peak MiB | result |",
            "| --- | ---: | --- |",
            *memory_rows,
        ]
        machine = bench.get("machine") or {}
        lines += ["", f"Machine: `{json.dumps(machine)}`"]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
