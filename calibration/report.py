"""Accuracy report of a lower-precision graph against the fp32 graph of the same tower.

Measured on held-out calibration data (never seen by calibration): cosine of the pooled
embeddings to fp32 (mean, 1st percentile, min), size on disk and speed on this machine, and,
when both towers are converted, retrieval agreement: text-to-image and image-to-text recall@k
with the fp32 ranking as the truth. With random weights these numbers only show faithfulness
to fp32, not retrieval quality: run the report on the real model with your own images.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clipedge.engine.onnxruntime_backend import OnnxruntimeOptions, OrtSession
from clipedge.engine.session import TowerSession
from clipedge.postprocess import pool
from clipedge.towers import tower_spec

from .feeds import Feed

REPORT_NAME = "accuracy_report.json"
RANDOM_WEIGHTS_NOTE = (
    "Cosine and recall are measured against the fp32 graph on held-out calibration data. "
    "They show how faithful a precision is to fp32, not retrieval quality: on random weights "
    "they say nothing about the real model; run the report on the real model with your data."
)


@dataclass
class TowerAccuracy:
    """One tower at one precision, against fp32 on the held-out feeds."""

    tower: str
    precision: str
    samples: int
    cosine_mean: float
    cosine_p1: float
    cosine_min: float
    bytes: int
    fp32_bytes: int
    ms_per_batch: float
    fp32_ms_per_batch: float
    target_cosine: float
    fp32_blocks: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.cosine_min >= self.target_cosine and not self.overflow

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def pooled_embeddings(session: TowerSession, tower: str, feeds: Sequence[Feed]) -> np.ndarray:
    """Run the feeds and pool as the runtime does (graphs may output pooled or token states)."""
    pooling = tower_spec(tower).pooling
    return np.concatenate([pool(session.run(feed), pooling, feed) for feed in feeds])


def timed_embeddings(
    session: TowerSession, tower: str, feeds: Sequence[Feed]
) -> tuple[np.ndarray, float]:
    """Embeddings and the median milliseconds per feed batch (one warm-up run first)."""
    session.run(feeds[0])
    times, rows = [], []
    for feed in feeds:
        start = time.perf_counter()
        rows.append(pooled_embeddings(session, tower, [feed]))
        times.append((time.perf_counter() - start) * 1000)
    return np.concatenate(rows), float(np.median(times))


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each candidate row to its reference row."""
    return (normalise(reference) * normalise(candidate)).sum(-1)


def cosine_stats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    cosine = row_cosines(reference, candidate)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_p1": float(np.percentile(cosine, 1)),
        "cosine_min": float(cosine.min()),
    }


def recall_at_k(
    reference_queries: np.ndarray,
    reference_items: np.ndarray,
    candidate_queries: np.ndarray,
    candidate_items: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Share of queries whose fp32 top-1 item is within the candidate's top k."""
    truth = (normalise(reference_queries) @ normalise(reference_items).T).argmax(1)
    scores = normalise(candidate_queries) @ normalise(candidate_items).T
    ranking = np.argsort(-scores, axis=1)
    return {
        f"recall@{k}": float(np.mean([t in row[:k] for t, row in zip(truth, ranking, strict=True)]))
        for k in ks
    }


def weights_file(graph: Path) -> Path:
    """Where a graph keeps its weights apart: ONNX external data, or OpenVINO IR's `.bin`."""
    if graph.suffix == ".xml":
        return graph.with_suffix(".bin")
    return graph.with_name(graph.name + ".data")


def graph_bytes(graph: Path) -> int:
    """Size of a graph with its weights file, if any."""
    data = weights_file(graph)
    return graph.stat().st_size + (data.stat().st_size if data.exists() else 0)


def cpu_session(graph: Path, threads: int | None = None) -> TowerSession:
    """A CPU session for a graph: onnxruntime for ONNX, OpenVINO (bf16, as the runtime
    runs it) for OpenVINO IR. No compiled-model cache: the search rewrites one path with
    other graphs, and trials have no business in the user's cache."""
    if graph.suffix == ".xml":
        from clipedge.engine.openvino_backend import OpenVinoOptions, OpenVinoSession

        return OpenVinoSession(graph, OpenVinoOptions(threads=threads, cache=False))
    return OrtSession(graph, "cpu", OnnxruntimeOptions(threads=threads))


def write_report(bundle_dir: Path, entries: list[dict], retrieval: dict) -> Path:
    path = bundle_dir / REPORT_NAME
    payload = {"note": RANDOM_WEIGHTS_NOTE, "towers": entries, "retrieval": retrieval}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(entries: Sequence[TowerAccuracy]) -> str:
    """A plain-text table for the export log."""
    header = (
        f"{'tower':<7} {'precision':<10} {'n':>4} {'cos mean':>9} {'cos p1':>9} {'cos min':>9} "
        f"{'size MB':>8} {'x fp32':>7} {'ms':>8} {'x fp32':>7} {'target':>7}  result"
    )
    lines = [header]
    for e in entries:
        lines.append(
            f"{e.tower:<7} {e.precision:<10} {e.samples:>4} {e.cosine_mean:>9.5f} "
            f"{e.cosine_p1:>9.5f} {e.cosine_min:>9.5f} {e.bytes / 1e6:>8.1f} "
            f"{e.bytes / e.fp32_bytes:>7.2f} {e.ms_per_batch:>8.1f} "
            f"{e.ms_per_batch / e.fp32_ms_per_batch:>7.2f} {e.target_cosine:>7.4f}  "
            f"{'pass' if e.passed else 'BELOW TARGET'}"
            + (f" (fp32 blocks: {', '.join(e.fp32_blocks)})" if e.fp32_blocks else "")
            + (f" (inf/NaN in: {', '.join(e.overflow[:5])})" if e.overflow else "")
        )
    return "\n".join(lines)
