"""The checked-in fixture bundles (tests/fixtures/tiny-bundle*) are what the exporter writes.

The runtime's tests load those bundles instead of exporting (so they run without torch);
this exports afresh and fails when the checked-in ones are stale. Regenerate them with
`python scripts/make_fixture_bundle.py`.

The export is byte-for-byte reproducible with the same torch and onnx, but other versions
may serialise the same graph differently, so the graphs are compared by what they compute
(the fixture's reference inputs, within 1e-6) and the manifest without its versions and
graph checksums; every other file must be identical.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="exporting needs the [export] extra (torch)")
import onnxruntime as ort  # noqa: E402

from conftest import BUNDLES, expected  # noqa: E402

SCRIPT = Path(__file__).parent.parent / "scripts" / "make_fixture_bundle.py"
REGENERATE = "stale: regenerate with `python scripts/make_fixture_bundle.py` and commit"


def _script():
    spec = importlib.util.spec_from_file_location("make_fixture_bundle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, Path]:
    return _script().make(tmp_path_factory.mktemp("fresh"))


def _comparable_manifest(bundle: Path) -> dict:
    """The manifest less what changes with the exporting environment: versions and the
    checksums / sizes of the graphs."""
    manifest = json.loads((bundle / "clipedge.json").read_text())
    manifest.pop("versions", None)
    manifest["files"] = {
        name: entry for name, entry in manifest["files"].items() if not name.endswith(".onnx")
    }
    return manifest


def _feeds(tower: str, reference: dict) -> list[dict[str, np.ndarray]]:
    if tower == "vision":
        return [{"pixel_values": expected("image_pixel_values.npy")}]
    ids = expected("text_batch_input_ids.npy")
    feeds = [{"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}]
    for row in reference["token_ids_default"][:3]:
        one = np.array([row], dtype=np.int64)
        feeds.append({"input_ids": one, "attention_mask": np.ones_like(one)})
    return feeds


def test_the_script_writes_every_checked_in_bundle():
    checked_in = {p.name for p in BUNDLES.iterdir() if (p / "clipedge.json").is_file()}
    assert checked_in == set(_script().BUNDLES)


@pytest.mark.parametrize("name", ["tiny-bundle", "tiny-bundle-token-states"])
def test_checked_in_bundle_is_what_the_exporter_writes(fresh, reference, name):
    new, old = fresh[name], BUNDLES / name
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir()), (
        REGENERATE
    )
    assert _comparable_manifest(new) == _comparable_manifest(old), REGENERATE
    for path in new.iterdir():
        if path.suffix != ".onnx":
            assert path.read_bytes() == (old / path.name).read_bytes(), (path.name, REGENERATE)
    cpu = ["CPUExecutionProvider"]
    for tower in ("text", "vision"):
        graph = f"{tower}.onnx"
        sessions = [ort.InferenceSession(str(b / graph), providers=cpu) for b in (new, old)]
        for feed in _feeds(tower, reference):
            now, then = (s.run(None, feed) for s in sessions)
            assert len(now) == len(then)
            for a, b in zip(now, then, strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype, (graph, REGENERATE)
                assert np.abs(a - b).max() <= 1e-6, (graph, REGENERATE)
