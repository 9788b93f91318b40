"""Shared fixtures: the tiny reference checkpoint and the fp32 bundles exported from it.

The bundles are checked in (tests/fixtures/tiny-bundle*, written by
scripts/make_fixture_bundle.py; tests/test_fixture_bundle.py fails when they are stale), so
the runtime's tests need no torch. Each session works on a copy, never the checked-in files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny"
CHECKPOINT = FIXTURE / "checkpoint"
EXPECTED = FIXTURE / "expected"
BUNDLES = Path(__file__).parent / "fixtures"  # tiny-bundle, tiny-bundle-token-states


@pytest.fixture(scope="session")
def reference() -> dict:
    """The fixture manifest: texts, token ids, image files and the cases."""
    return json.loads((EXPECTED / "manifest.json").read_text())


def expected(name: str) -> np.ndarray:
    return np.load(EXPECTED / name)


def assert_all_gone(processes: list, within: float = 2.0) -> None:
    """Every process (psutil.Process) has ended within `within` seconds. A zombie has ended:
    it only waits for its parent (pid 1 once orphaned, which in a container may not reap)."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=within)
    running = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    assert not running, f"left running: {running}"


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A .safetensors file as NumPy arrays: `safetensors.numpy.load_file` where installed
    (the export extra), else the format read directly (an 8-byte little-endian header size,
    a JSON header of dtype / shape / data offsets, the raw tensors)."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        pass
    else:
        return load_file(str(path))
    data = Path(path).read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + size :]
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        arrays[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(entry["shape"]).copy()
    return arrays


def _checked_in(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A session's copy of a checked-in bundle (tests may write beside the graphs)."""
    bundle = tmp_path_factory.mktemp(name) / name
    shutil.copytree(BUNDLES / name, bundle)
    return bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default export: pooled outputs inside the graphs."""
    return _checked_in(tmp_path_factory, "tiny-bundle")


@pytest.fixture(scope="session")
def tiny_token_states_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export with --token-states: graphs return last_hidden_state, the runtime pools."""
    return _checked_in(tmp_path_factory, "tiny-bundle-token-states")


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled-model caches go to a temporary folder, never the user's ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("cache")
    os.environ["CLIPEDGE_CACHE_DIR"] = str(path)
    return path


# ----- the lean run: the parity tests must run on the base install ---------------------------

# The runtime's and the graphs' parity with the official outputs needs only `pip install .`
# and the checked-in bundles. With CLIPEDGE_TEST_REQUIRE_PARITY=1 (the lean run of .ci/run) a
# skip in these modules fails the run: a skipped module, or a skipped test that is not one of
# MAY_SKIP (the few that truly need an extra).
PARITY_MODULES = (
    "test_runtime.py",
    "test_export_parity.py",
    "test_long_text_reference.py",
    "test_no_torch.py",
)
MAY_SKIP = {
    "test_every_sequence_length_runs",  # compares with the PyTorch tower
    "test_non_finite_output_names_the_item_and_the_remedy",  # rewrites a graph with onnx
}
REQUIRE_PARITY = os.environ.get("CLIPEDGE_TEST_REQUIRE_PARITY") == "1"


def _parity_failure(what: str, reason: object) -> str:
    return (
        f"{what} was skipped ({reason}), but the parity tests must run on the base install "
        "(CLIPEDGE_TEST_REQUIRE_PARITY=1); give it the checked-in bundles, or list it in "
        "conftest.MAY_SKIP if it truly needs an extra"
    )


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if REQUIRE_PARITY and report.skipped and collector.path.name in PARITY_MODULES:
        report.outcome = "failed"
        report.longrepr = _parity_failure(collector.path.name, report.longrepr)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if (
        REQUIRE_PARITY
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.path.name in PARITY_MODULES
        and getattr(item, "originalname", item.name) not in MAY_SKIP
    ):
        report.outcome = "failed"
        report.longrepr = _parity_failure(item.nodeid, report.longrepr)
    return report
