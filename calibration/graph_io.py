"""Reading and writing graphs for the converters: typed loading and the 2 GB protobuf rule.

A graph over protobuf's 2 GB limit (the full-size text tower) must keep its weights in an
external data file; every converter decides that with `needs_external_data`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model

PROTOBUF_LIMIT = 2**31 - 1
# Room for the graph itself beside the weights.
PROTOBUF_MARGIN = 64 << 20


def needs_external_data(nbytes: int) -> bool:
    """Whether a graph of `nbytes` (weights included) must store its weights externally."""
    return nbytes > PROTOBUF_LIMIT - PROTOBUF_MARGIN


def load_typed(path: Path, with_data: bool = True) -> onnx.ModelProto:
    """A graph with inferred types for every tensor; shape inference runs before the weights
    are read, so graphs over protobuf's 2 GB limit work too."""
    model = onnx.load(str(path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    # The exporter also lists weights in value_info; the fp16 converter would retype those
    # entries to fp16 even for weights it keeps fp32, and then cast fp32 weights "back".
    weights = {t.name for t in model.graph.initializer}
    for value in [v for v in model.graph.value_info if v.name in weights]:
        model.graph.value_info.remove(value)
    if with_data:
        load_external_data_for_model(model, str(Path(path).parent))
    return model


def save_model(model: onnx.ModelProto, dst: Path, external: bool | None = None) -> Path:
    """Save inline, or with every weight in one `<name>.data` file when over 2 GB (or when
    `external` says so: saving then writes the weights one by one, no 2 GB byte copy)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        os.remove(data)
    if external is None:
        external = needs_external_data(model.ByteSize())
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return dst


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    return types
