"""Mixed-precision search: keep the most sensitive units (blocks, or layer kinds inside blocks)
in higher precision until a target, judged on the held-out set the report uses.

1. Convert the whole tower; if its minimum cosine on the held-out feeds meets the target, done.
2. Rank the units cheaply: convert one unit at a time (everything else float) and measure it
   on the few held-out items the whole-tower graph got most wrong (they decide the minimum).
3. Keep the k most sensitive units float, the smallest k that meets the target on the whole
   held-out set: k = 1, 2, 4, ... until one does, then bisecting the last gap (accuracy grows
   with k, and the answer is usually a few units). A variant that misses on the worst items
   is a miss without running the rest; only passes run on every held-out item.

Every step prints what it did and, from the time of the first conversion, how long the rest
will take. The int8 converters quantise once and derive every variant from that graph
(`openvino_int8.with_float_inputs`, `onnx_variants.quantize_once`), so steps 2-3 cost seconds
of graph surgery and a run over a few held-out items (ranking) or all of them (step 3) each;
fp16 converts again per trial (seconds, no data).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .feeds import Feed
from .memory import stage
from .report import cpu_session, pooled_embeddings, row_cosines, weights_file

log = logging.getLogger(__name__)

# convert(keep_float_nodes, destination) -> graph path: any of the precision converters.
Converter = Callable[[Sequence[str], Path], Path]
# The held-out items with the lowest cosine under the whole-tower conversion rank the units:
# they decide the minimum, and a handful of items costs a fraction of the held-out set's time.
RANKING_ITEMS = 4


@dataclass(frozen=True)
class SearchResult:
    graph: Path
    min_cosine: float
    fp32_blocks: list[str]
    sensitivity: dict[str, float]


class HeldOut:
    """The held-out feeds and their fp32 embeddings, scored per item."""

    def __init__(self, tower: str, feeds: Sequence[Feed], reference: np.ndarray) -> None:
        self.tower, self.feeds, self.reference = tower, list(feeds), reference
        sizes = [len(next(iter(feed.values()))) for feed in self.feeds]
        self.bounds = np.cumsum([0, *sizes])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def cosines(self, graph: Path) -> np.ndarray:
        """Cosine to fp32 of every item, in order."""
        session, rows, times = cpu_session(graph), [], []
        for feed in self.feeds:  # timed per batch, for the report (no extra warm-up run)
            began = time.perf_counter()
            rows.append(pooled_embeddings(session, self.tower, [feed]))
            times.append((time.perf_counter() - began) * 1000)
        embeddings = np.concatenate(rows)
        self.last = (_file_state(graph), embeddings, float(np.median(times)))
        return row_cosines(self.reference, embeddings)

    def measured(self, graph: Path) -> tuple[np.ndarray, float] | None:
        """Embeddings and ms per batch of the last `cosines` run, if it ran on the graph that
        is at `graph` now (the accuracy report then need not run the held-out set again)."""
        last = getattr(self, "last", None)
        if last is None or last[0] != _file_state(graph):
            return None
        return last[1], last[2]

    def subset(self, items: Sequence[int]) -> HeldOut:
        """The chosen items (indices into this set), one feed per batch they come from: a
        batch's rows share its padding, so text rows of different batches stay apart."""
        chosen = np.sort(np.asarray(items, dtype=int))
        feeds = []
        for feed, start, stop in zip(self.feeds, self.bounds[:-1], self.bounds[1:], strict=True):
            rows = chosen[(chosen >= start) & (chosen < stop)] - start
            if len(rows):
                feeds.append({name: value[rows] for name, value in feed.items()})
        return HeldOut(self.tower, feeds, self.reference[chosen])


def _file_state(graph: Path) -> tuple:
    """What tells one graph file from a rewritten one: inode, size and mtime of the graph and
    of its weights file."""
    states = []
    for path in (graph, weights_file(graph)):
        try:
            stat = path.stat()
        except FileNotFoundError:
            states.append(None)
            continue
        states.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(states)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def search_fallback(
    convert: Converter,
    units: dict[str, list[str]],
    other_nodes: Sequence[str],
    held_out: HeldOut,
    target_cosine: float,
    destination: Path,
    report: Callable[[str], None] = log.info,
) -> SearchResult:
    """The fewest float units that meet `target_cosine` on `held_out` (every unit float at
    worst; `other_nodes` are float only while ranking)."""
    start = time.perf_counter()
    with stage("whole-tower conversion"):
        graph = convert([], destination)
        cosines = held_out.cosines(graph)
    best = float(cosines.min())
    report(
        f"whole tower converted: min cosine {best:.5f} on {len(held_out)} held-out items "
        f"(target {target_cosine}) in {_duration(time.perf_counter() - start)}"
    )
    if best >= target_cosine:
        return SearchResult(graph, best, [], {})
    # NaN (an overflow in the variant) sorts last in argsort: count it as the worst there is.
    worst = held_out.subset(np.argsort(np.nan_to_num(cosines, nan=-2.0))[:RANKING_ITEMS])
    with stage("search: ranking"):
        sensitivity = _rank(convert, units, other_nodes, worst, destination, report)
    ranked = sorted(units, key=lambda unit: -sensitivity[unit])

    def keep(k: int) -> list[str]:
        return [n for unit in ranked[:k] for n in units[unit]]

    def attempt(k: int, full: bool = False) -> float:
        """Min cosine with the k most sensitive units float. A miss on the worst items is a
        miss on the set, so only a variant that passes there (or a `full` one) runs on all."""
        began = time.perf_counter()
        convert(keep(k), destination)
        score, scope = None, "all held-out items"
        if not full and len(worst) < len(held_out):
            score, scope = float(worst.cosines(destination).min()), f"the {len(worst)} worst"
        if score is None or score >= target_cosine:
            score, scope = float(held_out.cosines(destination).min()), "all held-out items"
        report(
            f"  {k} float unit(s): min cosine {score:.5f} on {scope} "
            f"({_duration(time.perf_counter() - began)})"
        )
        return score

    report(
        "finding how many to keep float: 1, 2, 4, ... units until the target is met, then "
        f"halving the gap; a variant that misses on the {len(worst)} worst items is not run "
        "on the others"
    )
    with stage("search: finding k"):
        high, results = _find_k(
            attempt, convert, keep, len(ranked), best, target_cosine, destination
        )
    report(f"kept float: {', '.join(ranked[:high]) or 'none'}")
    return SearchResult(destination, results[high], ranked[:high], sensitivity)


def _find_k(
    attempt: Callable[..., float],
    convert: Converter,
    keep: Callable[[int], list[str]],
    units: int,
    best: float,
    target_cosine: float,
    destination: Path,
) -> tuple[int, dict[int, float]]:
    """The smallest k that meets the target (1, 2, 4, ... then bisecting the last gap); the
    chosen graph is left at `destination`."""
    low, high = 0, units  # k = low fails; k = high (all float) is the fallback
    results, last, k = {0: best}, 0, 1
    while k < high:
        results[k], last = attempt(k), k
        if results[k] >= target_cosine:
            high = k
            break
        low, k = k, 2 * k
    while high - low > 1:
        middle = (low + high) // 2
        results[middle], last = attempt(middle), middle
        if results[middle] >= target_cosine:
            high = middle
        else:
            low = middle
    if last != high:  # the last graph built was a miss: build the chosen one
        if high in results:
            convert(keep(high), destination)
        else:
            results[high] = attempt(high, full=True)
    return high, results


def _rank(
    convert: Converter,
    units: dict[str, list[str]],
    other_nodes: Sequence[str],
    worst: HeldOut,
    destination: Path,
    report: Callable[[str], None],
) -> dict[str, float]:
    """Drift (1 - min cosine on the `worst` items) when only that unit is converted."""
    drift: dict[str, float] = {}
    report(
        f"ranking {len(units)} units: one variant each, scored on the {len(worst)} held-out "
        "items the whole tower got most wrong; the time left follows the first"
    )
    began = time.perf_counter()
    # Trials live in a scratch folder beside the bundle's graphs (same disk; a full-size trial
    # is up to 2 GB), removed even when the search is interrupted (Ctrl-C).
    with tempfile.TemporaryDirectory(prefix=".clipedge-search-", dir=destination.parent) as scratch:
        for number, unit in enumerate(units, 1):
            keep_float = [n for u, ns in units.items() if u != unit for n in ns]
            trial = Path(scratch) / f"sensitivity-{unit}{destination.suffix}"
            graph = convert([*keep_float, *other_nodes], trial)
            drift[unit] = 1.0 - float(worst.cosines(graph).min())
            _remove_graph(graph)  # one trial on disk at a time
            each = (time.perf_counter() - began) / number
            left = (
                f", about {_duration(each * (len(units) - number))} left"
                if number < len(units)
                else ""
            )
            report(f"  ranked {number}/{len(units)} {unit}: drift {drift[unit]:.5f}{left}")
    return drift


def _remove_graph(graph: Path) -> None:
    graph.unlink(missing_ok=True)
    weights_file(graph).unlink(missing_ok=True)
