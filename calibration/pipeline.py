"""Add calibrated lower-precision graphs to an exported bundle, with an accuracy report.

For each tower and precision: convert the fp32 graph (with the mixed-precision search when
the whole-tower conversion misses its target), measure it against fp32 on held-out data,
add it to the manifest with its device and accuracy, and write `accuracy_report.json`.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

import clipedge
from clipedge.bundle.manifest import Accuracy, GraphEntry, Manifest, describe_files, read_manifest
from clipedge.errors import ClipEdgeError
from clipedge.model import ClipEdgeModel

from .blocks import nodes_by_block
from .data import CalibrationSet, tower_feeds
from .feeds import Feed
from .precisions import PRECISIONS, check_precisions
from .report import (
    TowerAccuracy,
    cosine_stats,
    cpu_session,
    format_table,
    graph_bytes,
    recall_at_k,
    timed_embeddings,
    write_report,
)
from .search import HeldOut, search_fallback

log = logging.getLogger(__name__)


class CalibrationError(ClipEdgeError, RuntimeError):
    """Calibration could not finish (a converter or a graph failed)."""


class BelowTargetError(CalibrationError):
    """A precision missed its accuracy target (and the caller did not allow that)."""


def _other_nodes(model: onnx.ModelProto, blocks: dict[str, list[str]]) -> list[str]:
    inside = {name for names in blocks.values() for name in names}
    return [node.name for node in model.graph.node if node.name not in inside]


def _tower_precision(
    tower: str,
    precision: str,
    fp32_graph: Path,
    destination: Path,
    calib_feeds: Sequence[Feed],
    held_feeds: Sequence[Feed],
    reference_held: np.ndarray,
    fp32_ms: float,
    method: str,
    target: float,
    search: bool,
    report: Callable[[str], None],
) -> tuple[TowerAccuracy, np.ndarray]:
    spec = PRECISIONS[precision]
    convert = spec.make_converter(fp32_graph, calib_feeds, method)
    fp32_blocks: list[str] = []
    if search:
        graph_model = onnx.load(str(fp32_graph), load_external_data=False)
        blocks = nodes_by_block(graph_model)
        result = search_fallback(
            convert,
            blocks,
            _other_nodes(graph_model, blocks),
            HeldOut(tower, held_feeds, reference_held),
            target,
            destination,
            report=lambda line: report(f"[calibrate] {tower} {precision}: {line}"),
        )
        fp32_blocks = result.fp32_blocks
    else:
        convert([], destination)
    del convert  # converters that derive variants hold both graphs in memory
    overflow: list[str] = []
    if precision == "fp16":
        from .fp16 import find_overflow

        overflow = find_overflow(destination, calib_feeds)
    embeddings, ms = timed_embeddings(cpu_session(destination), tower, held_feeds)
    stats = cosine_stats(reference_held, embeddings)
    accuracy = TowerAccuracy(
        tower=tower,
        precision=precision,
        samples=len(embeddings),
        bytes=graph_bytes(destination),
        fp32_bytes=graph_bytes(fp32_graph),
        ms_per_batch=ms,
        fp32_ms_per_batch=fp32_ms,
        target_cosine=target,
        fp32_blocks=fp32_blocks,
        overflow=overflow,
        **stats,
    )
    return accuracy, embeddings


def _calibrate_towers(
    bundle_dir: Path,
    staging: Path,
    manifest: Manifest,
    model: ClipEdgeModel,
    precisions: Sequence[str],
    calibration: CalibrationSet,
    method: str,
    targets: dict[str, float] | None,
    search: bool,
    report: Callable[[str], None],
) -> tuple[list[TowerAccuracy], dict, dict]:
    """Every precision of every tower, written into `staging`: the accuracies, the retrieval
    agreement and the towers' manifest entries with the new graphs."""
    results: list[TowerAccuracy] = []
    held_embeddings: dict[tuple[str, str], np.ndarray] = {}
    towers = dict(manifest.towers)
    for tower, tower_manifest in manifest.towers.items():
        fp32_graph = bundle_dir / tower_manifest.graphs["fp32"].file
        calib_feeds = tower_feeds(model, tower, calibration, held_out=False)
        held_feeds = tower_feeds(model, tower, calibration, held_out=True)
        fp32 = cpu_session(fp32_graph)
        reference_held, fp32_ms = timed_embeddings(fp32, tower, held_feeds)
        del fp32
        held_embeddings[(tower, "fp32")] = reference_held
        graphs = dict(tower_manifest.graphs)
        for precision in precisions:
            spec = PRECISIONS[precision]
            graph_file = spec.graph_file(tower)
            target = (targets or {}).get(precision, spec.default_target)
            report(f"[calibrate] {tower} {precision}: converting (target cosine {target})")
            accuracy, embeddings = _tower_precision(
                tower,
                precision,
                fp32_graph,
                staging / graph_file,
                calib_feeds,
                held_feeds,
                reference_held,
                fp32_ms,
                method,
                target,
                search,
                report,
            )
            report(
                f"[calibrate] {tower} {precision}: min cosine {accuracy.cosine_min:.5f} "
                f"{'pass' if accuracy.passed else 'BELOW TARGET'}"
            )
            results.append(accuracy)
            held_embeddings[(tower, precision)] = embeddings
            graphs[precision] = GraphEntry(
                file=graph_file,
                precision=precision,
                device=spec.device,
                accuracy=Accuracy(
                    cosine_min=accuracy.cosine_min,
                    cosine_mean=accuracy.cosine_mean,
                    target=target,
                    passed=accuracy.passed,
                    method=spec.method(method),
                    fp32_blocks=accuracy.fp32_blocks,
                    overflow=accuracy.overflow,
                ),
            )
            gc.collect()
        towers[tower] = replace(tower_manifest, graphs=graphs)
    return results, _retrieval_agreement(held_embeddings, precisions), towers


def calibrate_bundle(
    bundle_dir: str | Path,
    precisions: Sequence[str],
    calibration: CalibrationSet,
    method: str = "max",
    targets: dict[str, float] | None = None,
    search: bool = True,
    report: Callable[[str], None] = print,
) -> list[TowerAccuracy]:
    """Convert, measure and register every requested precision of every tower in the bundle."""
    check_precisions(precisions)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    model = clipedge.load(bundle_dir, backend="cpu", precision="fp32")
    # New graphs are written to a staging folder inside the bundle and moved into place with
    # the manifest at the end: an interrupted run leaves the bundle as it was (before, it left
    # re-calibrated graphs that no longer matched the manifest, and the bundle would not load).
    with tempfile.TemporaryDirectory(prefix=".clipedge-calibrate-", dir=bundle_dir) as staging:
        results, retrieval, towers = _calibrate_towers(
            bundle_dir,
            Path(staging),
            manifest,
            model,
            precisions,
            calibration,
            method,
            targets,
            search,
            report,
        )
        for staged in sorted(Path(staging).iterdir()):
            if staged.is_file():
                os.replace(staged, bundle_dir / staged.name)
        write_report(bundle_dir, [r.to_dict() for r in results], retrieval)
        updated = replace(manifest, towers=towers, files=describe_files(bundle_dir))
        updated.save(bundle_dir)
    report(format_table(results))
    for precision, scores in retrieval.items():
        report(f"[calibrate] retrieval agreement {precision} vs fp32: {scores}")
    report(
        f"[calibrate] {bundle_dir}: {len(results)} graph(s) registered in clipedge.json, "
        "accuracy_report.json written"
    )
    return results


def _retrieval_agreement(
    embeddings: dict[tuple[str, str], np.ndarray], precisions: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Text-to-image and image-to-text recall@1/@5 with the fp32 ranking as the truth."""
    if ("text", "fp32") not in embeddings or ("vision", "fp32") not in embeddings:
        return {}
    text_ref, image_ref = embeddings[("text", "fp32")], embeddings[("vision", "fp32")]
    agreement = {}
    for precision in precisions:
        text, image = embeddings[("text", precision)], embeddings[("vision", precision)]
        t2i = recall_at_k(text_ref, image_ref, text, image)
        i2t = recall_at_k(image_ref, text_ref, image, text)
        agreement[precision] = {
            **{f"text_to_image_{k}": v for k, v in t2i.items()},
            **{f"image_to_text_{k}": v for k, v in i2t.items()},
        }
    return agreement
