"""The tower table is what export writes, calibration reads and the runtime runs."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx", reason="reads the graphs with onnx (the export extra)")

import onnx

from clipedge.bundle.manifest import read_manifest
from clipedge.towers import TOWERS, tower_spec


@pytest.mark.parametrize("pooled", [True, False])
def test_exported_graphs_and_manifest_follow_the_table(
    tiny_bundle, tiny_token_states_bundle, pooled
):
    bundle = tiny_bundle if pooled else tiny_token_states_bundle
    manifest = read_manifest(bundle)
    assert set(manifest.towers) == set(TOWERS)
    for name, tower in manifest.towers.items():
        spec = tower_spec(name)
        graph = onnx.load(str(bundle / tower.graphs["fp32"].file), load_external_data=False)
        assert [i.name for i in graph.graph.input] == list(spec.inputs)
        assert [o.name for o in graph.graph.output] == [spec.output_name(pooled)]
        for value in graph.graph.input:
            dims = value.type.tensor_type.shape.dim
            symbolic = [d.dim_param for d in dims if d.dim_param]
            assert len(symbolic) == len(spec.dynamic_axes)
        assert tower.pooling == spec.pooling
        assert tower.output_dim == manifest.embed_dim


def test_unknown_tower_is_named():
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        tower_spec("audio")
