"""Export one tower to ONNX with dynamic batch (and sequence) axes.

Uses the torch.export-based exporter (`dynamo=True`), which writes opset 18+ graphs with
LayerNormalization and no TorchScript leftovers. A graph with more than 64 MB of weights keeps
them in one external data file beside it (protobuf's limit is 2 GB; the graph's onnxruntime CPU
form, `fused_attention.py`, reads the same file).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from clipedge.towers import TEXT, VISION, tower_spec

from .config import ClipConfig
from .fused_attention import write_onnxruntime_cpu_graph
from .graph_check import GraphReport, check_graph
from .opset import DEFAULT_OPSET

log = logging.getLogger(__name__)
# The exporter logs a warning per torchvision op it cannot register; clipedge uses none.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

# Weights above this go to one external data file beside the graph (protobuf holds < 2 GB),
# which the graph's onnxruntime CPU form then reads too instead of a copy.
EXTERNAL_WEIGHTS_ABOVE = 64 << 20
# Shapes used only to trace; the exported axes are symbolic.
TRACE_BATCH, TRACE_LENGTH = 2, 16


@dataclass(frozen=True)
class ExportedGraph:
    tower: str
    path: Path
    external_data: Path | None
    input_names: list[str]
    output_names: list[str]
    report: GraphReport
    # The same graph with attention fused for onnxruntime's CPU provider (fused_attention.py).
    onnxruntime_cpu_path: Path | None = None


def tower_io(tower: str, pooled: bool) -> tuple[list[str], list[str]]:
    """Input and output names of a tower's graph, from the tower table."""
    spec = tower_spec(tower)
    return list(spec.inputs), [spec.output_name(pooled)]


def _text_sample(cfg: ClipConfig) -> tuple[torch.Tensor, ...]:
    ids = torch.full((TRACE_BATCH, TRACE_LENGTH), 5, dtype=torch.int64)
    return ids, torch.ones_like(ids)


def _vision_sample(cfg: ClipConfig) -> tuple[torch.Tensor, ...]:
    size = cfg.vision.image_size
    return (torch.zeros(TRACE_BATCH, 3, size, size),)


SAMPLES = {TEXT.name: _text_sample, VISION.name: _vision_sample}


def sample_inputs(tower: str, cfg: ClipConfig) -> tuple[torch.Tensor, ...]:
    """Tracing inputs of one tower."""
    return SAMPLES[tower](cfg)


# Kept: the module scope of each node, which maps nodes to blocks for mixed precision.
KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)


def _strip_debug_metadata(model) -> None:
    """Drop the exporter's stack traces and FX dumps (local paths, megabytes of text)."""
    for node in model.graph.all_nodes():
        for key in [k for k in node.metadata_props if k not in KEPT_METADATA]:
            del node.metadata_props[key]


def _check_written_opset(model: onnx.ModelProto, tower: str, opset: int) -> None:
    """The exporter keeps its own opset when converting fails; the bundle must not lie."""
    written = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if written != [opset]:
        raise RuntimeError(f"{tower}.onnx has opset {written}, not the requested {opset}")


def export_tower(
    module: torch.nn.Module,
    tower: str,
    cfg: ClipConfig,
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
) -> ExportedGraph:
    """Trace `module` and write `<tower>.onnx` (plus `<tower>.onnx.data` when > 2 GB), and
    its onnxruntime CPU form when it has masked attention to fuse."""
    pooled = bool(getattr(module, "pooled", True))
    input_names, output_names = tower_io(tower, pooled)
    axes = {
        "batch": torch.export.Dim("batch", min=1, max=4096),
        "sequence": torch.export.Dim("sequence", min=1, max=cfg.text.max_position_embeddings),
    }
    dynamic = {
        name: {i: axes[axis] for i, axis in enumerate(tower_spec(tower).dynamic_axes)}
        for name in input_names
    }
    # The exporter prints progress and version warnings meant for its own developers.
    chatter = io.StringIO()
    with (
        torch.no_grad(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(chatter),
    ):
        warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
        program = torch.onnx.export(
            module,
            sample_inputs(tower, cfg),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    log.debug("torch.onnx output:\n%s", chatter.getvalue())
    _strip_debug_metadata(program.model)
    path = out_dir / f"{tower}.onnx"
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_WEIGHTS_ABOVE
    program.save(str(path), external_data=external)
    del program
    data_path = path.with_name(path.name + ".data")
    if not external and data_path.exists():
        os.remove(data_path)
    model = onnx.load(str(path), load_external_data=False)
    _check_written_opset(model, tower, opset)
    report = check_graph(model)
    log.info("%s.onnx ops: %s", tower, report.histogram_text())
    return ExportedGraph(
        tower=tower,
        path=path,
        external_data=data_path if external else None,
        input_names=input_names,
        output_names=output_names,
        report=report,
        onnxruntime_cpu_path=write_onnxruntime_cpu_graph(path),
    )
