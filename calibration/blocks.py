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


def block_of(node: onnx.NodeProto) -> str | None:
    """`layers.N` / `blocks.N` for nodes inside a block, None for embeddings and heads."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            for scope in ast.literal_eval(prop.value):
                if BLOCK.match(scope):
                    return scope
    return None


def nodes_by_block(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names per block, blocks in graph order (`layers.0`, `layers.1`, ...)."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for node in model.graph.node:
        block = block_of(node)
        if block is not None:
            blocks[block].append(node.name)
    return dict(sorted(blocks.items(), key=lambda item: int(item[0].split(".")[1])))
