"""Shared fixtures: the tiny reference checkpoint and bundles exported from it once per run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny"
CHECKPOINT = FIXTURE / "checkpoint"
EXPECTED = FIXTURE / "expected"


@pytest.fixture(scope="session")
def reference() -> dict:
    """The fixture manifest: texts, token ids, image files and the cases."""
    return json.loads((EXPECTED / "manifest.json").read_text())


def expected(name: str) -> np.ndarray:
    return np.load(EXPECTED / name)


def _export(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs) -> Path:
    pytest.importorskip("torch", reason="exporting needs the [export] extra (torch)")
    from clipedge.export.pipeline import export_bundle

    bundle = tmp_path_factory.mktemp(name)
    result = export_bundle(str(CHECKPOINT), bundle, report=lambda line: None, **kwargs)
    assert result.ok, result.verifications
    return bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default export: pooled outputs inside the graphs."""
    return _export(tmp_path_factory, "bundle")


@pytest.fixture(scope="session")
def tiny_token_states_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export with --token-states: graphs return last_hidden_state, the runtime pools."""
    return _export(tmp_path_factory, "bundle_token_states", token_states=True)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled-model caches go to a temporary folder, never the user's ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("cache")
    os.environ["CLIPEDGE_CACHE_DIR"] = str(path)
    return path
