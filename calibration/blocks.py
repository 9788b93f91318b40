"""Map graph nodes to the transformer block they came from (`layers.3`, `blocks.17`), or the
module outside the blocks (`patch_embed`, `norm`).

The exporter keeps each node's PyTorch module scope in the `pkg.torch.onnx.name_scopes`
metadata; mixed-precision search uses it to quantise or keep one unit at a time.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict

import onnx

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
BLOCK = re.compile(r"^(layers|blocks)\.(\d+)$")
# Ops whose weights a converter quantises: a module without one is no unit worth a variant.
WEIGHT_OPS = {"Conv", "MatMul", "Gemm", "Gather"}


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


def nodes_by_unit(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The search's units: every block (`nodes_by_block`), then each module outside the
    blocks that holds quantised weights (`patch_embed`, `word_embeddings`), so the search can keep
    those float too: with all 24 image blocks float, an int8 patch-embedding convolution
    alone held the full-size image tower at min cosine 0.98. Nodes with no module (an op
    the exporter named at the top level) belong to no unit."""
    outside: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        # the last scope is the op's own name; "_..." are the exporter's, not modules
        module = [s for s in scopes_of(node)[:-1] if s and not s.startswith("_")]
        if block_of(node) is None and module:
            outside[module[0]].append(node)
    weighted = {
        module: [node.name for node in nodes]
        for module, nodes in outside.items()
        if any(node.op_type in WEIGHT_OPS for node in nodes)
    }
    return {**nodes_by_block(model), **weighted}
