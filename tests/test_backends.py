"""Execution plan, backend registry and TensorRT EP settings (the logic runs anywhere)."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

import clipedge
from clipedge import OnnxruntimeOptions, OpenVinoOptions, ProfileLimits, TensorrtEpOptions
from clipedge.bundle.manifest import read_manifest
from clipedge.engine import onnxruntime_backend, plan
from clipedge.engine.onnxruntime_backend import tensorrt_provider_options
from clipedge.engine.profiles import tower_profile
from clipedge.engine.registry import BACKENDS
from clipedge.engine.tensorrt_backend import TensorrtOptions

from conftest import expected

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(HAS_CUDA, reason="checks the plan of a CPU-only machine")
def test_auto_plans_cpu_and_fastest_passing_precision(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    execution = plan.plan_execution(manifest, tiny_bundle)
    assert execution.backend == "cpu" and execution.auto
    assert execution.precisions == {"text": "fp32", "vision": "fp32"}
    # onnxruntime's CPU provider loads the graphs with attention fused
    assert execution.towers["text"].graph == tiny_bundle / "text.onnxruntime-cpu.onnx"
    assert execution.towers["vision"].graph == tiny_bundle / "vision.onnxruntime-cpu.onnx"


def test_unknown_backend(tiny_bundle):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        clipedge.load(tiny_bundle, backend="tpu")


def test_every_backend_is_registered_with_its_options():
    assert {name: b.options_type for name, b in BACKENDS.items()} == {
        "cpu": OnnxruntimeOptions,
        "cuda": OnnxruntimeOptions,
        "tensorrt-native": TensorrtOptions,
        "tensorrt": TensorrtEpOptions,
        "openvino": OpenVinoOptions,
    }


def test_options_of_another_backend_are_refused(tiny_bundle):
    with pytest.raises(TypeError, match="backend 'cpu' takes OnnxruntimeOptions"):
        clipedge.load(tiny_bundle, backend="cpu", backend_options=OpenVinoOptions())


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback path of a CPU-only onnxruntime")
def test_requested_gpu_backend_falls_back_with_warning(tiny_bundle):
    with pytest.warns(RuntimeWarning, match="falling back to cpu") as record:
        model = clipedge.load(tiny_bundle, backend="cuda")
    assert record[0].filename == __file__  # the caller's line, through load and the plan
    model.encode_text("a")
    assert model.plan.backend == "cpu"
    assert model.session("text").provider == "CPUExecutionProvider"


def test_tensorrt_profile_options(tmp_path):
    options = tensorrt_provider_options(
        {
            "input_ids": ([1, 1], [8, 512], [32, 8192]),
            "attention_mask": ([1, 1], [8, 512], [32, 8192]),
        },
        tmp_path,
    )
    assert options["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert options["trt_profile_opt_shapes"] == "input_ids:8x512,attention_mask:8x512"
    assert options["trt_profile_max_shapes"] == "input_ids:32x8192,attention_mask:32x8192"
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path)


class RecordedSession(Exception):
    """Raised by the stand-in InferenceSession once it has recorded its arguments."""


def test_tensorrt_profile_reaches_the_session(tiny_bundle, tmp_path, monkeypatch):
    """What `clipedge.load(backend="tensorrt")` hands onnxruntime: the profile from the
    options' limits and the cache folder (recorded, no GPU needed)."""
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(onnxruntime_backend, "preload_cuda_libraries", lambda: None)
    calls = []

    def record(graph, options, providers, provider_options):
        calls.append((graph, providers, provider_options))
        raise RecordedSession

    monkeypatch.setattr(ort, "InferenceSession", record)
    options = TensorrtEpOptions(
        limits=ProfileLimits(max_batch=16, opt_batch=4, max_length=256, opt_length=64),
        cache_dir=tmp_path / "engines",
    )
    model = clipedge.load(tiny_bundle, backend="tensorrt", backend_options=options)
    with pytest.raises(clipedge.BundleError):  # wraps RecordedSession
        model.encode_text(["a"], max_length=256)
    graph, used, provider_options = calls[0]
    assert graph.endswith("text.onnx") and used == providers
    trt = provider_options[0]
    assert trt["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert trt["trt_profile_opt_shapes"] == "input_ids:4x64,attention_mask:4x64"
    assert trt["trt_profile_max_shapes"] == "input_ids:16x256,attention_mask:16x256"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "engines")
    with pytest.raises(clipedge.BundleError):  # wraps RecordedSession
        model.encode_image(np.zeros((8, 8, 3), np.uint8))
    assert calls[1][2][0]["trt_profile_max_shapes"] == "pixel_values:16x3x64x64"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimization", ["disable", "basic", "all"])
def test_session_settings_keep_results(tiny_bundle, reference, threads, optimization):
    model = clipedge.load(
        tiny_bundle,
        backend="cpu",
        threads=threads,
        backend_options=OnnxruntimeOptions(optimization=optimization),
    )
    assert model.backend_options.threads == threads
    out = model.encode_text(reference["texts"])
    assert np.abs(out - expected("text_default_norm.npy")).max() <= 2e-5


def test_profiles_follow_limits(tiny_bundle):
    towers = read_manifest(tiny_bundle).towers
    limits = ProfileLimits(max_batch=16, opt_batch=4, max_length=1024, opt_length=64)
    text = tower_profile(towers["text"], limits)
    assert text["input_ids"] == ([1, 1], [4, 64], [16, 1024]) == text["attention_mask"]
    vision = tower_profile(towers["vision"], limits)
    assert vision["pixel_values"] == ([1, 3, 64, 64], [4, 3, 64, 64], [16, 3, 64, 64])
    with pytest.raises(ValueError, match="opt_batch"):
        ProfileLimits(max_batch=2, opt_batch=4)


@pytest.mark.skipif(HAS_CUDA, reason="auto takes a GPU provider before OpenVINO")
def test_auto_takes_openvino_for_openvino_int8_bundles_when_installed(tiny_bundle, monkeypatch):
    pytest.importorskip("openvino", reason="needs the optional openvino package")
    manifest = read_manifest(tiny_bundle)
    assert plan.choose_backend("auto", manifest) == "cpu"  # no int8-ov graphs
    monkeypatch.setattr(plan, "prefers_openvino", lambda graphs: True)
    assert plan.choose_backend("auto", manifest) == "openvino"
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    assert plan.choose_backend("auto", manifest) == "cpu"
