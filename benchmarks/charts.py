"""Bar charts for the README, written by the benchmarks' `--render` (matplotlib, dev extra).

One chart per case: a bar per engine or setting, labelled with its value, and optionally a
dashed line for a bound the bars are read against (the CPU's int8 floor, a goal).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Line:
    """A vertical reference line: `value` in the chart's unit, and what it is."""

    value: float
    label: str


def bar_chart(
    path: Path,
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    unit: str,
    lines: Sequence[Line] = (),
    subtitle: str = "",
) -> Path:
    """Write a horizontal bar chart as PNG; the first bar is at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.8), dpi=110)
    rows = list(range(len(labels)))[::-1]
    bars = axes.barh(rows, values, color="#4c72b0")
    axes.bar_label(
        bars,
        labels=[f"{v:.0f} {unit}" if v >= 1000 else f"{v:.3g} {unit}" for v in values],
        padding=3,
        fontsize=8,
    )
    axes.set_yticks(rows, labels, fontsize=8)
    for line, style in zip(lines, ("--", ":", "-."), strict=False):
        axes.axvline(line.value, color="#c44e52", linestyle=style, linewidth=1.2, label=line.label)
    if lines:
        axes.legend(
            fontsize=8,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12 - 0.4 / len(labels)),
            ncol=len(lines),
            frameon=False,
        )
    axes.set_xlim(0, max([*values, *(line.value for line in lines)]) * 1.25)
    axes.set_xlabel(unit, fontsize=8)
    axes.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--out (JSON), --render (an earlier --out instead of a run), --charts (PNG folder)."""
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--render", type=Path, help="the table (and --charts) of an earlier --out")
    parser.add_argument("--charts", type=Path, help="write PNG charts into this folder")


def run_or_render(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict],
    print_table: Callable[[dict], None],
    render: Callable[[dict, Path], list[Path]],
) -> None:
    """Results of a fresh run (saved to --out) or of --render; then the table and charts."""
    if args.render:
        results = json.loads(args.render.read_text())
    elif args.bundle is None:
        raise SystemExit("--bundle (or --render) is required")
    else:
        results = run(args)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    for path in render(results, args.charts) if args.charts else []:
        print(f"wrote {path}")
