"""Backend selection and TensorRT EP settings (the logic runs anywhere; GPU runs are skipped)."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

import clipedge
from clipedge.engine.onnxruntime_backend import resolve_providers, tensorrt_provider_options

from conftest import expected

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_auto_picks_best_available():
    providers = resolve_providers("auto")
    best = next(p for p in providers if p in ort.get_available_providers())
    assert providers[0] == best and providers[-1] == "CPUExecutionProvider"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        resolve_providers("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback path of a CPU-only onnxruntime")
def test_requested_gpu_backend_falls_back_with_warning(tiny_bundle):
    with pytest.warns(RuntimeWarning, match="falling back to CPUExecutionProvider"):
        model = clipedge.load(tiny_bundle, backend="cuda")
        model.encode_text("a")
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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimization", ["disable", "basic", "all"])
def test_session_settings_keep_results(tiny_bundle, reference, threads, optimization):
    model = clipedge.load(tiny_bundle, backend="cpu", threads=threads, optimization=optimization)
    out = model.encode_text(reference["texts"])
    assert np.abs(out - expected("text_default_norm.npy")).max() <= 2e-5


def test_profiles_follow_limits(tiny_bundle):
    from clipedge.bundle.manifest import read_manifest
    from clipedge.engine.profiles import ProfileLimits, tower_profile

    towers = read_manifest(tiny_bundle).towers
    limits = ProfileLimits(max_batch=16, opt_batch=4, max_length=1024, opt_length=64)
    text = tower_profile("text", towers["text"], limits)
    assert text["input_ids"] == ([1, 1], [4, 64], [16, 1024]) == text["attention_mask"]
    vision = tower_profile("vision", towers["vision"], limits)
    assert vision["pixel_values"] == ([1, 3, 64, 64], [4, 3, 64, 64], [16, 3, 64, 64])
    with pytest.raises(ValueError, match="trt_max_length=2048"):
        limits.check(8, 2048)
    with pytest.raises(ValueError, match="trt_max_batch=64"):
        limits.check(64)
    with pytest.raises(ValueError, match="opt_batch"):
        ProfileLimits(max_batch=2, opt_batch=4)


@pytest.mark.skipif(HAS_CUDA, reason="auto takes a GPU provider before OpenVINO")
def test_auto_takes_openvino_for_openvino_int8_bundles_when_installed(monkeypatch):
    pytest.importorskip("openvino", reason="needs the optional openvino package")
    assert resolve_providers("auto", openvino_graphs=True) == ["OpenVINO"]
    assert resolve_providers("auto", openvino_graphs=False) == ["CPUExecutionProvider"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    assert resolve_providers("auto", openvino_graphs=True) == ["CPUExecutionProvider"]
