"""OpenVINO backend on the tiny bundle: parity with onnxruntime fp32, bf16 accuracy, threads."""

from __future__ import annotations

import dataclasses
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

import clipedge
from clipedge.bundle.manifest import BundleError
from clipedge.engine.openvino_backend import (
    INSTALL_HINT,
    OpenVinoOptions,
    OpenVinoSession,
    compile_config,
    import_openvino,
)

from conftest import FIXTURE

HAS_OPENVINO = True
try:
    import openvino  # noqa: F401
except ImportError:
    HAS_OPENVINO = False
NEEDS_OPENVINO = pytest.mark.skipif(
    not HAS_OPENVINO, reason=f"OpenVINO is an optional extra: {INSTALL_HINT}"
)


@pytest.fixture(scope="module")
def feeds(tiny_bundle, reference) -> dict[str, list[dict[str, np.ndarray]]]:
    """Calibration-style feeds: several batch sizes and lengths through one session."""
    from clipedge.calibration.data import image_feeds, text_feeds  # (needs onnx)

    model = clipedge.load(tiny_bundle, backend="cpu")
    images = sorted((FIXTURE / "expected" / "inputs").glob("img*"))
    texts = reference["texts"]
    return {
        "text": list(text_feeds(model, texts, batch_size=3))
        + list(text_feeds(model, texts[:1], batch_size=1, max_length=7)),
        "vision": list(image_feeds(model, images, batch_size=2)),
    }


def _reference(tiny_bundle, tower, feeds):
    session = ort.InferenceSession(
        str(tiny_bundle / f"{tower}.onnx"), providers=["CPUExecutionProvider"]
    )
    return [session.run(None, feed)[0] for feed in feeds[tower]]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_missing_openvino_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'clipedge\[openvino\]'"):
        import_openvino()


def test_compile_config():
    config = compile_config("bf16", 2, {"NUM_STREAMS": "1"})
    assert config == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16",
        "INFERENCE_NUM_THREADS": "2",
        "NUM_STREAMS": "1",
    }
    assert "INFERENCE_NUM_THREADS" not in compile_config("f32", None)
    with pytest.raises(ValueError, match="inference_precision"):
        OpenVinoOptions(inference_precision="int8")


@NEEDS_OPENVINO
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_f32_matches_onnxruntime(tiny_bundle, feeds, tower):
    session = OpenVinoSession(
        tiny_bundle / f"{tower}.onnx", OpenVinoOptions(inference_precision="f32")
    )
    assert session.provider == "OpenVINO-CPU f32"
    for feed, expected in zip(feeds[tower], _reference(tiny_bundle, tower, feeds), strict=True):
        output = session.run(feed)
        assert output.dtype == np.float32 and output.shape == expected.shape
        np.testing.assert_allclose(output, expected, atol=5e-5, rtol=0)


@NEEDS_OPENVINO
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_bf16_keeps_cosine(tiny_bundle, feeds, tower):
    session = OpenVinoSession(
        tiny_bundle / f"{tower}.onnx", OpenVinoOptions(inference_precision="bf16")
    )
    for feed, expected in zip(feeds[tower], _reference(tiny_bundle, tower, feeds), strict=True):
        assert _cosine(session.run(feed), expected).min() >= 0.999


@NEEDS_OPENVINO
def test_concurrent_runs_match_sequential(tiny_bundle, feeds):
    session = OpenVinoSession(
        tiny_bundle / "text.onnx", OpenVinoOptions(threads=1, inference_precision="f32")
    )
    work = feeds["text"] * 4
    sequential = [session.run(feed) for feed in work]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(session.run, work))
    for got, want in zip(concurrent, sequential, strict=True):
        np.testing.assert_array_equal(got, want)


@NEEDS_OPENVINO
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_throughput_mode_splits_batches_over_streams_in_order(tiny_bundle, feeds, tower):
    """Streams run slices of one batch at once; rows come back in input order, equal to one
    request's, also from several callers at a time."""
    graph = tiny_bundle / f"{tower}.onnx"
    latency = OpenVinoSession(graph, OpenVinoOptions(inference_precision="f32", cache=False))
    options = OpenVinoOptions(
        inference_precision="f32", mode="throughput", cache=False, properties={"NUM_STREAMS": "2"}
    )
    throughput = OpenVinoSession(graph, options)
    assert latency.streams == 1 and throughput.streams == 2
    batches = [feed for feed in feeds[tower] if len(next(iter(feed.values()))) > 1]
    assert batches, "the fixture has batches to split"
    for feed in batches:
        np.testing.assert_allclose(throughput.run(feed), latency.run(feed), atol=1e-5, rtol=0)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(throughput.run, batches * 3))
    for got, feed in zip(results, batches * 3, strict=True):
        np.testing.assert_allclose(got, latency.run(feed), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        OpenVinoOptions(mode="fast")


@NEEDS_OPENVINO
def test_outputs_are_not_overwritten_by_later_calls(tiny_bundle, feeds):
    session = OpenVinoSession(
        tiny_bundle / "vision.onnx", OpenVinoOptions(inference_precision="f32")
    )
    first = session.run(feeds["vision"][0])
    kept = first.copy()
    session.run(feeds["vision"][1])
    np.testing.assert_array_equal(first, kept)


@NEEDS_OPENVINO
def test_cache_dir_is_filled_and_reused(tiny_bundle, feeds, tmp_path):
    options = OpenVinoOptions(cache_dir=tmp_path / "cache")
    first = OpenVinoSession(tiny_bundle / "vision.onnx", options).run(feeds["vision"][0])
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")}
    assert stamps
    second = OpenVinoSession(tiny_bundle / "vision.onnx", options).run(feeds["vision"][0])
    # Imported, not compiled and written again.
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")} == stamps
    np.testing.assert_array_equal(first, second)


@NEEDS_OPENVINO
def test_provider_options_override_defaults(tiny_bundle):
    options = OpenVinoOptions(properties={"INFERENCE_PRECISION_HINT": "f32"})
    assert OpenVinoSession(tiny_bundle / "text.onnx", options).provider == "OpenVINO-CPU f32"


@NEEDS_OPENVINO
def test_unreadable_graph_is_a_bundle_error(tmp_path):
    graph = tmp_path / "text.onnx"
    graph.write_bytes(b"not a graph")
    with pytest.raises(BundleError, match="cannot load"):
        OpenVinoSession(graph)


@NEEDS_OPENVINO
def test_load_with_openvino_backend_matches_official(tiny_bundle, reference):
    import clipedge

    from conftest import expected

    model = clipedge.load(
        tiny_bundle, backend="openvino", backend_options=OpenVinoOptions(inference_precision="f32")
    )
    assert model.precisions == {"text": "fp32", "vision": "fp32"}
    out = model.encode_text(reference["texts"])
    assert np.abs(out - expected("text_default_norm.npy")).max() <= 1e-4
    assert model.session("text").provider.startswith("OpenVINO")


@NEEDS_OPENVINO
def test_compiled_models_are_cached_per_user_by_default(tiny_bundle, feeds, private_cache_dir):
    """Default: `$CLIPEDGE_CACHE_DIR/openvino/<version>/<bundle hash>`, filled by the first
    session and imported (not rewritten) by the next; `cache=False` writes nothing."""
    from clipedge.engine.openvino_backend import default_cache_dir

    folder = default_cache_dir(tiny_bundle / "vision.onnx", openvino.get_version())
    assert folder.parent.parent == private_cache_dir / "openvino"
    first = OpenVinoSession(tiny_bundle / "vision.onnx").run(feeds["vision"][0])
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert stamps
    second = OpenVinoSession(tiny_bundle / "vision.onnx").run(feeds["vision"][0])
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps
    np.testing.assert_array_equal(first, second)
    OpenVinoSession(tiny_bundle / "text.onnx", OpenVinoOptions(cache=False))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == stamps


@NEEDS_OPENVINO
def test_cache_keeps_each_inference_precision_apart(tiny_bundle, feeds, tmp_path):
    """OpenVINO's own cache key ignores the inference precision: with one shared folder a bf16
    session imported the f32 blob and returned NaN. Each config gets its own folder."""
    cached = OpenVinoOptions(cache_dir=tmp_path, inference_precision="f32")
    OpenVinoSession(tiny_bundle / "text.onnx", cached).run(feeds["text"][0])
    bf16 = dataclasses.replace(cached, inference_precision="bf16")
    got = OpenVinoSession(tiny_bundle / "text.onnx", bf16).run(feeds["text"][0])
    fresh = dataclasses.replace(bf16, cache=False)
    want = OpenVinoSession(tiny_bundle / "text.onnx", fresh).run(feeds["text"][0])
    np.testing.assert_array_equal(got, want)
    assert len(list(tmp_path.iterdir())) == 2
