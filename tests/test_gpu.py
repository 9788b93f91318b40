"""The GPU path for real: onnxruntime's CUDA execution provider on an NVIDIA GPU.

Skipped (with the reason) where onnxruntime-gpu or a GPU is missing. Checks the fp32 graphs
against the official outputs and the calibrated fp16 / int8 graphs against fp32, all executed
by CUDA kernels (the provider is asserted, so a silent CPU fallback fails the test).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest

import clipedge

from conftest import EXPECTED, expected

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu and an NVIDIA GPU",
    ),
]
# CUDA fp32 GEMMs may use TF32 tensor cores (onnxruntime's default): ~1e-3 relative.
GPU_FP32_MAX_ABS = 2e-3


@pytest.fixture(scope="module")
def images(reference) -> list[str]:
    return [str(EXPECTED / name) for name in reference["images"]]


def test_cuda_fp32_matches_official(tiny_bundle, reference, images):
    model = clipedge.load(tiny_bundle, backend="cuda", precision="fp32")
    text = model.encode_text(reference["texts"])
    image = model.encode_image(images)
    assert model.session("text").provider == "CUDAExecutionProvider"
    assert model.session("vision").provider == "CUDAExecutionProvider"
    assert np.abs(text - expected("text_default_norm.npy")).max() <= GPU_FP32_MAX_ABS
    assert np.abs(image - expected("image_norm.npy")).max() <= GPU_FP32_MAX_ABS


def _tensorrt_libraries() -> bool:
    """onnxruntime-gpu lists TensorRT whether or not TensorRT's own libraries are there."""
    for name in ("libnvinfer.so.10", "libnvinfer.so.11"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def test_auto_takes_the_best_provider_that_starts(tiny_bundle, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a provider that cannot start is not worth a warning
        model = clipedge.load(tiny_bundle, precision="fp32")
        model.encode_text(reference["texts"][:1])
    expected_provider = (
        "TensorrtExecutionProvider" if _tensorrt_libraries() else "CUDAExecutionProvider"
    )
    assert model.session("text").provider == expected_provider


@pytest.mark.skipif(
    "TensorrtExecutionProvider" not in ort.get_available_providers() or not _tensorrt_libraries(),
    reason="needs onnxruntime's TensorRT execution provider and TensorRT's libraries",
)
def test_tensorrt_fp32_matches_official(tiny_bundle, reference, tmp_path):
    model = clipedge.load(
        tiny_bundle,
        backend="tensorrt",
        precision="fp32",
        backend_options=clipedge.TensorrtEpOptions(cache_dir=tmp_path),
    )
    text = model.encode_text(reference["texts"])
    assert model.session("text").provider == "TensorrtExecutionProvider"
    assert np.abs(text - expected("text_default_norm.npy")).max() <= GPU_FP32_MAX_ABS
    assert any(tmp_path.iterdir()), "no engine or timing cache written"


def _photos() -> str:
    """Real photographs for calibration: a folder named by CLIPEDGE_TEST_PHOTOS (the GPU
    machine has no scikit-image; scripts/device/ carries the same pictures), else
    scikit-image's sample data."""
    folder = os.environ.get("CLIPEDGE_TEST_PHOTOS")
    if folder:
        return f"{folder}/*"
    pytest.importorskip("skimage.data", reason="real photographs for calibration")
    import skimage.data

    return f"{skimage.data.data_dir}/*.png"


def test_calibrated_fp16_and_int8_run_on_cuda(tiny_bundle, reference, images, tmp_path):
    from clipedge.cli import main

    photos = _photos()
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    captions = EXPECTED.parents[1] / "calibration" / "captions.jsonl"
    args = ["calibrate", str(bundle), "--precisions", "fp16,int8"]
    args += ["--calibration-images", photos, "--calibration-texts", str(captions)]
    assert main(args) == 0
    fp32 = clipedge.load(bundle, backend="cuda", precision="fp32")
    reference_text, reference_image = (
        fp32.encode_text(reference["texts"]),
        fp32.encode_image(images),
    )
    # The default on a GPU is the fastest precision that passed: int8, then fp16.
    assert clipedge.load(bundle, backend="cuda").precisions == {"text": "int8", "vision": "int8"}
    for precision, target in (("fp16", 0.999), ("int8", 0.99)):
        model = clipedge.load(bundle, backend="cuda", precision=precision)
        text, image = model.encode_text(reference["texts"]), model.encode_image(images)
        assert model.session("text").provider == "CUDAExecutionProvider"
        assert np.isfinite(text).all() and np.isfinite(image).all()
        assert (text * reference_text).sum(1).min() >= target, precision
        assert (image * reference_image).sum(1).min() >= target, precision
