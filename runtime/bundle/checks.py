"""What a load checks before any encode: the files, then the graphs it will run against the
manifest (input and output names, ranks, fixed sizes, the embedding width), read from each
ONNX file's header (`graph_io`), never by loading a graph into a session.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from ..errors import BundleError
from .files import check_files
from .graph_io import GraphTensor, WireError, read_graph_io
from .manifest import Manifest, TensorSpec

log = logging.getLogger(__name__)


def check_bundle(
    bundle_dir: Path,
    manifest: Manifest,
    graphs: Mapping[str, Path],
    verify_checksums: bool | None = None,
) -> None:
    """The files (sizes; hashes per `verify_checksums`, see `files`), then the graph each tower
    will run (`graphs`: tower -> graph file) against the manifest."""
    check_files(bundle_dir, manifest, verify_checksums)
    for tower, graph in graphs.items():
        check_graph(manifest, tower, Path(graph))


def _compare(
    where: str, graph: Path, spec: TensorSpec, found: dict[str, GraphTensor], kind: str
) -> GraphTensor:
    tensor = found.get(spec.name)
    if tensor is None:
        raise BundleError(
            f"{where}: the manifest names {kind} {spec.name!r}, the graph {graph.name} has "
            f"{', '.join(map(repr, found)) or 'none'}"
        )
    if tensor.shape is None:
        return tensor
    if len(tensor.shape) != len(spec.shape):
        raise BundleError(
            f"{where} ({spec.name}): the manifest's shape {spec.shape} has rank "
            f"{len(spec.shape)}, the graph {graph.name} declares {tensor.shape}"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
        if isinstance(want, int) and isinstance(have, int) and want != have:
            raise BundleError(
                f"{where} ({spec.name}): axis {axis} is {want} in the manifest, {have} in the "
                f"graph {graph.name}"
            )
    return tensor


def check_graph(manifest: Manifest, tower: str, graph: Path) -> None:
    """A `BundleError` naming the manifest field that the graph file contradicts."""
    if graph.suffix != ".onnx":  # OpenVINO IR: OpenVINO reads and checks it
        log.debug("%s: not an ONNX graph, its inputs and outputs are not checked", graph)
        return
    entry = manifest.towers[tower]
    try:
        found = read_graph_io(graph)
    except (OSError, WireError) as exc:
        raise BundleError(f"{graph} is not a readable ONNX graph: {exc}") from exc
    where = f"towers.{tower}"
    for index, spec in enumerate(entry.inputs):
        _compare(f"{where}.inputs[{index}]", graph, spec, found.inputs, "input")
    output = found.outputs.get(entry.outputs[0].name)
    width = (output.shape or [None])[-1] if output is not None else None
    if isinstance(width, int) and width != manifest.embed_dim:
        raise BundleError(
            f"embed_dim: the manifest says {manifest.embed_dim}, the {tower} graph "
            f"{graph.name} returns {entry.outputs[0].name} {width} wide"
        )
    _compare(f"{where}.outputs[0]", graph, entry.outputs[0], found.outputs, "output")
