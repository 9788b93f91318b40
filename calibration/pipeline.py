"""Add calibrated lower-precision graphs to an exported bundle, with an accuracy report.

For each tower and precision: convert the fp32 graph (with the mixed-precision search when
the whole-tower conversion misses its target), measure it against fp32 on held-out data,
add it to the manifest with its device and accuracy, and write `accuracy_report.json`.

One tower at a time, its feeds and sessions freed before the next; each stage logs its time
and peak RSS (`memory.Stages`). Finished graphs are kept in a work folder inside the bundle
(`.clipedge-calibrate-work/`), one entry per tower and precision keyed by the fp32 graph's
sha256, the calibration data and the settings: an interrupted run leaves the bundle's files
and manifest as they were, and the next run with the same key reuses what the first finished.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

import clipedge
from clipedge.bundle.manifest import Accuracy, GraphEntry, Manifest, describe_files, read_manifest
from clipedge.errors import ClipEdgeError, OptionError
from clipedge.model import ClipEdgeModel
from clipedge.towers import TEXT

from . import memory
from .blocks import nodes_by_unit
from .data import CalibrationSet, tower_feeds
from .feeds import Feed
from .memory import Stages
from .precisions import PRECISIONS, Conversion, check_precisions
from .report import (
    REPORT_NAME,
    TowerAccuracy,
    cosine_stats,
    cpu_session,
    format_table,
    graph_bytes,
    recall_at_k,
    timed_embeddings,
    weights_file,
    write_report,
)
from .search import HeldOut, search_fallback
from .weight_bits import resolve_weight_bits

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
    source: Path,
    destination: Path,
    calib_feeds: Sequence[Feed],
    held_feeds: Sequence[Feed],
    reference_held: np.ndarray,
    fp32_ms: float,
    conversion: Conversion,
    target: float,
    search: bool,
    report: Callable[[str], None],
) -> tuple[TowerAccuracy, np.ndarray]:
    spec = PRECISIONS[precision]
    convert = spec.make_converter(source, calib_feeds, conversion)
    fp32_blocks: list[str] = []
    held_out = HeldOut(tower, held_feeds, reference_held)
    if search:
        graph_model = onnx.load(str(source), load_external_data=False)
        blocks = nodes_by_unit(graph_model)
        others = _other_nodes(graph_model, blocks)
        del graph_model
        result = search_fallback(
            convert,
            blocks,
            others,
            held_out,
            target,
            destination,
            report=lambda line: report(f"[calibrate] {tower} {precision}: {line}"),
        )
        fp32_blocks = result.fp32_blocks
    else:
        with memory.stage("conversion"):
            convert([], destination)
    del convert  # converters that derive variants hold both graphs in memory
    gc.collect()
    overflow: list[str] = []
    if precision == "fp16":
        from .fp16 import find_overflow

        with memory.stage("inf/NaN check"):
            overflow = find_overflow(destination, calib_feeds)
    # The search ran the held-out set on the graph it left (unless its last step rewrote it).
    measured = held_out.measured(destination)
    if measured is None:
        with memory.stage("accuracy report"):
            measured = timed_embeddings(cpu_session(destination), tower, held_feeds)
    embeddings, ms = measured
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


def check_towers(towers: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The towers to calibrate, in the bundle's order (all of them when None)."""
    if towers is None:
        return list(available)
    unknown = [t for t in towers if t not in available]
    if unknown or not towers:
        raise OptionError(
            f"unknown tower(s) {unknown or towers!r}; this bundle has {', '.join(available)}"
        )
    return [t for t in available if t in towers]


# ----------------------------------------------------------------------- resumable work folder

WORK_DIR = ".clipedge-calibrate-work"
RESULT_NAME = "result.json"
HELD_OUT_NAME = "held_out.npy"
# Bump when a converter changes what it writes for the same inputs and settings.
WORK_FORMAT = 1


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _data_key(calibration: CalibrationSet, tower: str) -> str:
    """The calibration and held-out inputs of one tower: texts as they are, images by path,
    size and modification time (hashing every picture would cost more than it saves)."""

    def describe(items: Sequence) -> list:
        if tower == TEXT.name:
            return list(items)
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in map(Path, items)]

    return _digest(
        [describe(calibration.items(tower, False)), describe(calibration.items(tower, True))]
    )


def _fp32_sha256(manifest: Manifest, bundle_dir: Path, graph: Path) -> list[str | None]:
    """The fp32 graph's sha256 (and its weights file's) as the manifest records them (the
    bundle's own check of its files at load time covers them)."""
    names = [graph.name, weights_file(graph).name]
    return [manifest.files.get(name, {}).get("sha256") for name in names]


@dataclass(frozen=True)
class WorkEntry:
    """One tower at one precision (or the fp32 reference) in the work folder."""

    folder: Path

    @property
    def done(self) -> bool:
        return (self.folder / RESULT_NAME).is_file()

    def start(self) -> Path:
        """An empty folder for this entry (whatever an interrupted attempt left is removed)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        return self.folder

    def finish(self, result: dict, held_out: np.ndarray) -> None:
        np.save(self.folder / HELD_OUT_NAME, held_out)
        partial = self.folder / (RESULT_NAME + ".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(partial, self.folder / RESULT_NAME)  # written last: marks the entry done

    def load(self) -> tuple[dict, np.ndarray]:
        result = json.loads((self.folder / RESULT_NAME).read_text())
        return result, np.load(self.folder / HELD_OUT_NAME)


def _work_entry(work: Path, name: str, key: dict) -> WorkEntry:
    return WorkEntry(work / f"{name}-{_digest({**key, 'format': WORK_FORMAT})}")


# ----------------------------------------------------------------------------- the towers


def _calibrate_towers(
    bundle_dir: Path,
    work: Path,
    manifest: Manifest,
    model: ClipEdgeModel,
    towers_wanted: Sequence[str],
    precisions: Sequence[str],
    calibration: CalibrationSet,
    conversion: Conversion,
    targets: dict[str, float] | None,
    search: bool,
    report: Callable[[str], None],
    stages: Stages,
) -> tuple[list[TowerAccuracy], dict, dict, list[Path]]:
    """Every precision of every wanted tower, finished in the work folder: the accuracies,
    the retrieval agreement, the towers' manifest entries with the new graphs and the
    finished graph files (to move into the bundle)."""
    results: list[TowerAccuracy] = []
    held_embeddings: dict[tuple[str, str], np.ndarray] = {}
    graph_files: list[Path] = []
    towers = dict(manifest.towers)
    for tower in towers_wanted:
        tower_manifest = manifest.towers[tower]
        fp32_entry = tower_manifest.graphs["fp32"]
        fp32_graph = bundle_dir / fp32_entry.file
        # onnxruntime's CPU form of it (attention fused, where the export wrote one): the CPU
        # reference runs it, and the onnxruntime CPU precision is converted from it.
        fp32_cpu_graph = bundle_dir / fp32_entry.file_for("cpu")
        base_key = {
            "fp32": _fp32_sha256(manifest, bundle_dir, fp32_graph),
            "data": _data_key(calibration, tower),
            "clipedge": clipedge.__version__,
        }
        feeds: dict[bool, list[Feed]] = {}

        def tower_feeds_once(held_out: bool, tower: str = tower, feeds: dict = feeds) -> list[Feed]:
            if held_out not in feeds:
                feeds[held_out] = tower_feeds(model, tower, calibration, held_out=held_out)
            return feeds[held_out]

        reference_entry = _work_entry(work, f"{tower}.fp32", base_key)
        if not reference_entry.done:
            with stages(f"{tower} fp32", "feeds and reference embeddings"):
                folder = reference_entry.start()
                fp32 = cpu_session(fp32_cpu_graph)
                reference, fp32_ms = timed_embeddings(fp32, tower, tower_feeds_once(True))
                del fp32
                reference_entry.finish({"ms_per_batch": fp32_ms}, reference)
            del folder
        reference_result, reference_held = reference_entry.load()
        fp32_ms = reference_result["ms_per_batch"]
        held_embeddings[(tower, "fp32")] = reference_held
        graphs = dict(tower_manifest.graphs)
        for precision in precisions:
            spec = PRECISIONS[precision]
            graph_file = spec.graph_file(tower)
            target = (targets or {}).get(precision, spec.default_target)
            scope = f"{tower} {precision}"
            entry = _work_entry(
                work,
                f"{tower}.{precision}",
                {
                    **base_key,
                    "precision": precision,
                    "method": spec.method(conversion.method),
                    "weight_bits": conversion.weight_bits if spec.int8_weights else None,
                    "target": target,
                    "search": search,
                    "max_memory_gb": memory.budget_gb() if precision == "int8-ov" else None,
                },
            )
            if entry.done:
                row, embeddings = entry.load()
                row.pop("passed", None)
                accuracy = TowerAccuracy(**row)
                report(
                    f"[calibrate] {scope}: reusing the graph a previous run finished "
                    f"({entry.folder.name})"
                )
            else:
                report(f"[calibrate] {scope}: converting (target cosine {target})")
                folder = entry.start()
                with memory.scope(stages, scope), stages(scope, "total"):
                    calib_feeds = tower_feeds_once(False) if spec.uses_feeds else []
                    accuracy, embeddings = _tower_precision(
                        tower,
                        precision,
                        fp32_graph,
                        fp32_cpu_graph if spec.device == "cpu" else fp32_graph,
                        folder / graph_file,
                        calib_feeds,
                        tower_feeds_once(True),
                        reference_held,
                        fp32_ms,
                        conversion,
                        target,
                        search,
                        report,
                    )
                    del calib_feeds
                    gc.collect()
                entry.finish(accuracy.to_dict(), embeddings)
            report(
                f"[calibrate] {scope}: min cosine {accuracy.cosine_min:.5f} "
                f"{'pass' if accuracy.passed else 'BELOW TARGET'}"
            )
            results.append(accuracy)
            held_embeddings[(tower, precision)] = embeddings
            destination = entry.folder / graph_file
            graph_files += [destination, weights_file(destination)]
            graphs[precision] = GraphEntry(
                file=graph_file,
                precision=precision,
                device=spec.device,
                accuracy=Accuracy(
                    cosine_min=accuracy.cosine_min,
                    cosine_mean=accuracy.cosine_mean,
                    target=target,
                    passed=accuracy.passed,
                    method=spec.method(conversion.method),
                    fp32_blocks=accuracy.fp32_blocks,
                    overflow=accuracy.overflow,
                ),
                weight_bits=conversion.weight_bits if spec.int8_weights else None,
            )
        towers[tower] = replace(tower_manifest, graphs=graphs)
        # One tower at a time: its feeds and whatever the converters left go before the next.
        feeds.clear()
        gc.collect()
    return results, _retrieval_agreement(held_embeddings, precisions), towers, graph_files


def _longest_row_tokens(manifest: Manifest, tower: str) -> int:
    """Tokens of the longest calibration row: the passages' default text length, or a
    whole image's patches and CLS."""
    from .openvino_int8 import VISION_PATCH

    settings = manifest.towers[tower].settings
    if hasattr(settings, "image_size"):
        return (int(settings.image_size) // VISION_PATCH) ** 2 + 1
    return int(getattr(settings, "default_max_length", 512))


def _merged_report(
    bundle_dir: Path, results: Sequence[TowerAccuracy], retrieval: dict
) -> tuple[list[dict], dict]:
    """This run's rows, plus the rows of an earlier report for the towers and precisions this
    run did not touch (`--towers text` keeps the vision rows). Retrieval agreement needs both
    towers: an earlier figure is kept only for precisions this run did not change."""
    rows = [r.to_dict() for r in results]
    path = bundle_dir / REPORT_NAME
    if not path.is_file():
        return rows, retrieval
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        return rows, retrieval
    done = {(r.tower, r.precision) for r in results}
    kept = [
        r for r in earlier.get("towers", []) if (r.get("tower"), r.get("precision")) not in done
    ]
    touched = {r.precision for r in results}
    kept_retrieval = {p: v for p, v in earlier.get("retrieval", {}).items() if p not in touched}
    return kept + rows, {**kept_retrieval, **retrieval}


def calibrate_bundle(
    bundle_dir: str | Path,
    precisions: Sequence[str],
    calibration: CalibrationSet,
    method: str = "max",
    targets: dict[str, float] | None = None,
    search: bool = True,
    report: Callable[[str], None] = print,
    towers: Sequence[str] | None = None,
    max_memory_gb: float | None = None,
    weight_bits: str | int = "auto",
) -> list[TowerAccuracy]:
    """Convert, measure and register every requested precision of every tower in the bundle
    (`towers`: only these), planned to peak within `max_memory_gb` (refused up front when no
    plan fits), int8 weights in `weight_bits` bits (`resolve_weight_bits`)."""
    check_precisions(precisions)
    conversion = Conversion(method, resolve_weight_bits(weight_bits))
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    towers_wanted = check_towers(towers, list(manifest.towers))
    row_tokens = {
        t: (
            graph_bytes(bundle_dir / manifest.towers[t].graphs["fp32"].file),
            _longest_row_tokens(manifest, t),
        )
        for t in towers_wanted
    }
    for line in memory.check_budget(row_tokens, precisions, max_memory_gb):
        report(f"[calibrate] {line}")
    stages = Stages(report=report)
    model = clipedge.load(bundle_dir, backend="cpu", precision="fp32")
    # New graphs are finished in a work folder inside the bundle and moved into place with
    # the manifest at the end: an interrupted run leaves the bundle's files and manifest as
    # they were (before, it left re-calibrated graphs that no longer matched the manifest, and
    # the bundle would not load), and the next run reuses every finished entry.
    work = bundle_dir / WORK_DIR
    work.mkdir(exist_ok=True)
    with memory.budget(max_memory_gb):
        results, retrieval, new_towers, graph_files = _calibrate_towers(
            bundle_dir,
            work,
            manifest,
            model,
            towers_wanted,
            precisions,
            calibration,
            conversion,
            targets,
            search,
            report,
            stages,
        )
    model.close()
    for staged in graph_files:
        if staged.is_file():
            os.replace(staged, bundle_dir / staged.name)
    rows, retrieval = _merged_report(bundle_dir, results, retrieval)
    write_report(bundle_dir, rows, retrieval)
    # Entries already signed were checked when the model loaded; only what this run wrote
    # is hashed (a stray file in the folder is not signed into the manifest).
    kept = {name: info for name, info in manifest.files.items() if (bundle_dir / name).is_file()}
    names = [staged.name for staged in graph_files if (bundle_dir / staged.name).is_file()]
    written = describe_files(bundle_dir, [*names, REPORT_NAME])
    updated = replace(manifest, towers=new_towers, files={**kept, **written})
    updated.save(bundle_dir)
    shutil.rmtree(work, ignore_errors=True)
    report(format_table(results))
    for precision, scores in retrieval.items():
        report(f"[calibrate] retrieval agreement {precision} vs fp32: {scores}")
    report(
        f"[calibrate] {bundle_dir}: {len(results)} graph(s) registered in clipedge.json, "
        f"accuracy_report.json written; peak RSS {stages.peak_bytes / 1e9:.1f} GB"
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
