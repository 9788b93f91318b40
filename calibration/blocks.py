"""Map graph nodes to the transformer block they came from (`layers.3`, `blocks.17`).

The exporter keeps each node's PyTorch module scope in the `pkg.torch.onnx.name_scopes`
metadata; mixed-precision search uses it to quantise or keep one block at a time.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict

import onnx

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
BLOCK = re.compile(r"^(layers|blocks)\.(\d+)$")


def scopes_of(node: onnx.NodeProto) -> list[str]:
    """The PyTorch module scopes the exporter recorded for a node, outermost first."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            return list(ast.literal_eval(prop.value))
    return []


def nodes_in_scope(model: onnx.ModelProto, suffix: str) -> list[str]:
    """Names of the nodes inside any module whose scope ends with `suffix` (`mlp.w3`)."""
    return [
        node.name
        for node in model.graph.node
        if any(scope.endswith(suffix) for scope in scopes_of(node))
    ]


def block_of(node: onnx.NodeProto) -> str | None:
    """`layers.N` / `blocks.N` for nodes inside a block, None for embeddings and heads."""
    return next((scope for scope in scopes_of(node) if BLOCK.match(scope)), None)


def nodes_by_block(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names per block, blocks in graph order (`layers.0`, `layers.1`, ...)."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        block = block_of(node)
        if block is not None:
            blocks[block].append(node.name)
    return dict(sorted(blocks.items(), key=lambda item: int(item[0].split(".")[1])))
