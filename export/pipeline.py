"""`clipedge export`: checkpoint -> bundle, one tower at a time to keep peak memory low."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from clipedge.bundle.manifest import Manifest
from clipedge.bundle.writing import check_target, staged_bundle
from clipedge.errors import ClipEdgeError
from clipedge.towers import check_tower_names

from .bundle_writer import copy_support_files, write_manifest
from .onnx_export import ExportedGraph, export_tower
from .opset import DEFAULT_OPSET, check_opset
from .source import CheckpointSource, resolve_source
from .verify import Verification, verify_graph
from .weights import load_towers

TOWERS = ("text", "vision")


class ExportError(ClipEdgeError, RuntimeError):
    """The export produced a graph that fails its TensorRT readiness check."""


@dataclass(frozen=True)
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    graphs: list[ExportedGraph]
    verifications: list[Verification]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verifications)


def export_bundle(
    source: str,
    bundle_dir: str | Path,
    towers: Sequence[str] = TOWERS,
    opset: int = DEFAULT_OPSET,
    token_states: bool = False,
    revision: str | None = None,
    report: Callable[[str], None] = print,
    overwrite: bool = False,
) -> ExportResult:
    """Export the requested towers of `source` into `bundle_dir` and verify them.

    The bundle is written into a staging folder beside `bundle_dir` and swapped in only when
    complete, so a failed export leaves nothing behind. A non-empty `bundle_dir` is refused
    unless `overwrite`, and even then only an existing bundle is replaced (whole: no stale
    graphs), never a folder with anything else in it (`clipedge.bundle.writing`).
    """
    check_tower_names(towers)
    check_opset(opset)
    bundle_dir = check_target(bundle_dir, overwrite)
    with staged_bundle(bundle_dir, overwrite) as staging:
        checkpoint, graphs, verifications = _export_towers(
            staging, source, towers, opset, token_states, revision, report
        )
        report(f"[save] bundle {bundle_dir}")
        copy_support_files(checkpoint, staging)
        manifest = write_manifest(checkpoint, graphs, staging, opset)
    graphs = [
        replace(
            g,
            path=bundle_dir / g.path.name,
            external_data=bundle_dir / g.external_data.name if g.external_data else None,
        )
        for g in graphs
    ]
    return ExportResult(bundle_dir, manifest, graphs, verifications)


def _export_towers(
    out_dir: Path,
    source: str,
    towers: Sequence[str],
    opset: int,
    token_states: bool,
    revision: str | None,
    report: Callable[[str], None],
) -> tuple[CheckpointSource, list[ExportedGraph], list[Verification]]:
    """Load, export and verify one tower at a time into `out_dir`."""
    report(f"[load] resolving checkpoint {source}")
    checkpoint = resolve_source(source, revision)
    store = checkpoint.open_tensors()
    graphs, verifications = [], []
    for tower in towers:
        report(f"[load] building the {tower} tower (LoRA merged, strict key check)")
        module = load_towers(checkpoint.config, store, [tower], pooled=not token_states)[tower]
        report(f"[export] {tower}.onnx (opset {opset})")
        graph = export_tower(module, tower, checkpoint.config, out_dir, opset)
        report(f"[export] {tower}.onnx ops: {graph.report.histogram_text()}")
        if not graph.report.ok:
            raise ExportError(f"{tower}.onnx is not TensorRT-ready: {graph.report.problems}")
        forms = [(tower, graph.path)]
        if graph.onnxruntime_cpu_path is not None:
            forms.append((f"{tower} (onnxruntime CPU form)", graph.onnxruntime_cpu_path))
        for name, path in forms:
            report(f"[verify] {name}: onnxruntime vs PyTorch on sample inputs")
            check = verify_graph(module, graph, checkpoint.config, path)
            report(
                f"[verify] {name}: max-abs {check.max_abs:.3g} (normalised "
                f"{check.max_abs_normalised:.3g}), min cosine {check.min_cosine:.7f} "
                f"{'OK' if check.ok else 'FAILED'}"
            )
            verifications.append(check)
        graphs.append(graph)
        del module
        gc.collect()
    return checkpoint, graphs, verifications
