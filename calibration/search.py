"""Mixed-precision search: keep the most sensitive blocks in higher precision until a target.

1. Convert the whole tower; if it meets the target cosine, done.
2. Sensitivity: convert one block at a time (everything else left in float) and measure the
   drift of the pooled output (1 - min cosine to fp32) on the calibration feeds.
3. Fall back the k most sensitive blocks, with k found by binary search (accuracy grows with
   k, so about log2(blocks) conversions instead of one per block).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .report import cosine_stats, cpu_session, pooled_embeddings, weights_file

log = logging.getLogger(__name__)

# convert(exclude_nodes, destination) -> graph path: any of the precision converters.
Converter = Callable[[Sequence[str], Path], Path]


@dataclass(frozen=True)
class SearchResult:
    graph: Path
    min_cosine: float
    fp32_blocks: list[str]
    sensitivity: dict[str, float]


def _min_cosine(graph: Path, tower: str, feeds: Sequence[dict], reference: np.ndarray) -> float:
    embeddings = pooled_embeddings(cpu_session(graph), tower, feeds)
    return cosine_stats(reference, embeddings)["cosine_min"]


def block_sensitivity(
    convert: Converter,
    blocks: dict[str, list[str]],
    other_nodes: Sequence[str],
    tower: str,
    feeds: Sequence[dict],
    reference: np.ndarray,
    destination: Path,
) -> dict[str, float]:
    """Drift (1 - min cosine) when only that block is converted.

    Each trial graph is written beside `destination` (same format) and removed after use.
    """
    drift = {}
    for block in blocks:
        keep_float = [n for b, ns in blocks.items() if b != block for n in ns] + list(other_nodes)
        trial = destination.with_name(f"sensitivity-{block}{destination.suffix}")
        graph = convert(keep_float, trial)
        drift[block] = 1.0 - _min_cosine(graph, tower, feeds, reference)
        log.info("sensitivity %s %s: drift %.6f", tower, block, drift[block])
        _remove_graph(graph)
    return drift


def search_fallback(
    convert: Converter,
    blocks: dict[str, list[str]],
    other_nodes: Sequence[str],
    tower: str,
    feeds: Sequence[dict],
    reference: np.ndarray,
    target_cosine: float,
    destination: Path,
) -> SearchResult:
    """The fewest float blocks that meet `target_cosine` (all blocks float at worst)."""
    graph = convert([], destination)
    best = _min_cosine(graph, tower, feeds, reference)
    if best >= target_cosine:
        return SearchResult(graph, best, [], {})
    sensitivity = block_sensitivity(
        convert, blocks, other_nodes, tower, feeds, reference, destination
    )
    ranked = sorted(blocks, key=lambda b: -sensitivity[b])

    built = {"k": 0}

    def attempt(k: int) -> float:
        keep = [n for block in ranked[:k] for n in blocks[block]]
        convert(keep, destination)
        built["k"] = k
        return _min_cosine(destination, tower, feeds, reference)

    low, high = 0, len(ranked)  # k = low fails; k = high (all blocks float) is the fallback
    results = {0: best}
    while high - low > 1:
        middle = (low + high) // 2
        results[middle] = attempt(middle)
        if results[middle] >= target_cosine:
            high = middle
        else:
            low = middle
    if built["k"] != high:  # the last graph built may be a failing k: build the chosen one
        results[high] = attempt(high)
    return SearchResult(destination, results[high], ranked[:high], sensitivity)


def _remove_graph(graph: Path) -> None:
    graph.unlink(missing_ok=True)
    weights_file(graph).unlink(missing_ok=True)
