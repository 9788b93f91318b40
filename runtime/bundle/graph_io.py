"""A graph's inputs and outputs, read from the ONNX file without loading the graph.

The base install has no `onnx` package, and `onnx.load(path, load_external_data=False)` would
parse the whole file anyway (the vision tower's weights are inside its `.onnx`). This reads
the protobuf wire format directly from a memory map: it walks the top-level fields of
`ModelProto` to `graph`, steps over every node and initializer by its length (touching one
page per field, never the weights), and decodes only `GraphProto.input` / `output`
(`ValueInfoProto`: name, element type, shape). Field numbers are those of onnx.proto3.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

# Wire types.
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
# Field numbers (onnx/onnx.proto3).
MODEL_GRAPH = 7
GRAPH_INPUT, GRAPH_OUTPUT = 11, 12
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_ELEM_TYPE, TENSOR_SHAPE = 1, 2
SHAPE_DIM = 1
DIM_VALUE, DIM_PARAM = 1, 2

ELEM_TYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 16: "bfloat16"}


class WireError(ValueError):
    """The bytes are not the protobuf message they should be."""


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output: name, element type and shape (None: rank unknown)."""

    name: str
    dtype: str
    shape: list[int | str] | None


@dataclass(frozen=True)
class GraphIO:
    inputs: dict[str, GraphTensor]
    outputs: dict[str, GraphTensor]


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int):
    """(field number, wire type, value) of one message; LENGTH values are (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(data, pos, end)
        elif wire == LENGTH:
            size, pos = _varint(data, pos, end)
            if pos + size > end:
                raise WireError(f"field {number} runs past its message")
            value, pos = (pos, pos + size), pos + size
        elif wire == FIXED64:
            value, pos = None, pos + 8
        elif wire == FIXED32:
            value, pos = None, pos + 4
        else:
            raise WireError(f"unsupported wire type {wire} (field {number})")
        if pos > end:
            raise WireError(f"field {number} runs past its message")
        yield number, wire, value


def _text(data: memoryview, span: tuple[int, int]) -> str:
    return bytes(data[span[0] : span[1]]).decode("utf-8")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shape(data: memoryview, span: tuple[int, int]) -> list[int | str]:
    dims: list[int | str] = []
    for number, wire, value in _fields(data, *span):
        if number != SHAPE_DIM or wire != LENGTH:
            continue
        dim: int | str = "?"
        for inner, inner_wire, inner_value in _fields(data, *value):
            if inner == DIM_VALUE and inner_wire == VARINT:
                dim = _signed(inner_value)
            elif inner == DIM_PARAM and inner_wire == LENGTH:
                dim = _text(data, inner_value)
        dims.append(dim)
    return dims


def _value_info(data: memoryview, span: tuple[int, int]) -> GraphTensor:
    name, dtype, shape = "", "?", None
    for number, wire, value in _fields(data, *span):
        if number == VALUE_NAME and wire == LENGTH:
            name = _text(data, value)
        elif number == VALUE_TYPE and wire == LENGTH:
            for kind, kind_wire, tensor in _fields(data, *value):
                if kind != TYPE_TENSOR or kind_wire != LENGTH:
                    continue
                for field, field_wire, item in _fields(data, *tensor):
                    if field == TENSOR_ELEM_TYPE and field_wire == VARINT:
                        dtype = ELEM_TYPES.get(item, str(item))
                    elif field == TENSOR_SHAPE and field_wire == LENGTH:
                        shape = _shape(data, item)
    return GraphTensor(name, dtype, shape)


def read_graph_io(path: Path) -> GraphIO:
    """The graph inputs and outputs of an ONNX file; `WireError` when it is not one."""
    with open(path, "rb") as stream:
        if stream.seek(0, 2) == 0:
            raise WireError("empty file")
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            data = memoryview(mapped)
            try:
                return _graph_io(data)
            finally:
                data.release()


def _graph_io(data: memoryview) -> GraphIO:
    inputs: dict[str, GraphTensor] = {}
    outputs: dict[str, GraphTensor] = {}
    graph = next(
        (v for n, w, v in _fields(data, 0, len(data)) if n == MODEL_GRAPH and w == LENGTH), None
    )
    if graph is None:
        raise WireError("no graph in the model")
    for number, wire, value in _fields(data, *graph):
        if wire == LENGTH and number in (GRAPH_INPUT, GRAPH_OUTPUT):
            tensor = _value_info(data, value)
            (inputs if number == GRAPH_INPUT else outputs)[tensor.name] = tensor
    return GraphIO(inputs, outputs)
