"""Inference backends behind one small interface: one session per tower.

`TowerSession.run(feeds) -> first output` is all the model code needs, so onnxruntime (CPU,
CUDA or TensorRT execution providers) and the native TensorRT backend are interchangeable.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..bundle.manifest import BundleError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "cuda", "tensorrt", "openvino")
OPENVINO = "OpenVINO"  # pseudo-provider name: sessions come from openvino_backend
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
OPT_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "all": 99}


class TowerSession(Protocol):
    """What the model needs from a backend for one tower's graph."""

    provider: str

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class SessionOptions:
    """Backend settings shared by both towers.

    `threads` sets onnxruntime's intra-op threads (None: one per physical core);
    `optimization` is one of OPT_LEVELS; `cache_dir` holds TensorRT engine/timing caches.
    """

    threads: int | None = None
    optimization: str = "all"
    cache_dir: Path | None = None
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_providers(backend: str, openvino_graphs: bool = False) -> list[str]:
    """onnxruntime providers for a backend name, best first; warns when one is missing.

    `auto` takes TensorRT, then CUDA; without either it takes OpenVINO when the bundle has
    OpenVINO int8 graphs (`openvino_graphs`) and OpenVINO is installed, else the CPU provider.
    """
    if backend == OPENVINO.lower():
        return [OPENVINO]
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "tensorrt": [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
    }
    if backend == "auto":
        for candidate in ("tensorrt", "cuda"):
            if wanted[candidate][0] in available:
                log.info("backend auto: using %s (available: %s)", candidate, sorted(available))
                return wanted[candidate]
        if openvino_graphs and openvino_installed():
            log.info("backend auto: using openvino (the bundle has OpenVINO int8 graphs)")
            return [OPENVINO]
        return wanted["cpu"]
    if backend not in wanted:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    chosen = [p for p in wanted[backend] if p in available]
    if chosen[0] != wanted[backend][0]:
        warnings.warn(
            f"backend {backend!r}: {wanted[backend][0]} is not available in this onnxruntime "
            f"build (install onnxruntime-gpu); falling back to {chosen[0]}",
            RuntimeWarning,
            stacklevel=3,
        )
    return chosen


def tensorrt_provider_options(
    input_shapes: dict[str, tuple[list[int], list[int], list[int]]], cache_dir: Path
) -> dict[str, str]:
    """onnxruntime TensorRT EP options: explicit dynamic-shape profile and on-disk caches.

    `input_shapes` maps input name to (min, opt, max) shapes. Names and formats follow the
    onnxruntime TensorRT execution provider documentation.
    """

    def fmt(index: int) -> str:
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in shapes[index])}"
            for name, shapes in input_shapes.items()
        )

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": fmt(0),
        "trt_profile_opt_shapes": fmt(1),
        "trt_profile_max_shapes": fmt(2),
    }


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages (or PyTorch's) before the first GPU
    session, as the onnxruntime-gpu documentation advises: without it, a pip-only install
    cannot find them and onnxruntime silently falls back to the CPU."""
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):  # onnxruntime < 1.21: system libraries only
        return
    try:
        ort.preload_dlls()
    except Exception as exc:  # best effort: the session's fallback warning still follows
        log.warning("onnxruntime.preload_dlls() failed: %s", exc)


class OrtSession:
    """An onnxruntime InferenceSession for one graph (thread-safe `run`)."""

    def __init__(
        self,
        graph: Path,
        providers: list[str],
        options: SessionOptions,
        trt_shapes: dict[str, tuple[list[int], list[int], list[int]]] | None = None,
        warn_on_fallback: bool = True,
    ) -> None:
        """`warn_on_fallback=False` (backend "auto") logs instead of warning when the first
        provider cannot start, e.g. onnxruntime-gpu lists TensorRT without its libraries."""
        import onnxruntime as ort

        if options.optimization not in OPT_LEVELS:
            raise ValueError(f"optimization must be one of {list(OPT_LEVELS)}")
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel(
            OPT_LEVELS[options.optimization]
        )
        if options.threads is not None:
            session_options.intra_op_num_threads = options.threads
        if providers[0] in GPU_PROVIDERS:
            preload_cuda_libraries()
        provider_options = []
        for name in providers:
            extra = dict(options.provider_options.get(name, {}))
            if name == "TensorrtExecutionProvider" and trt_shapes:
                cache = options.cache_dir or graph.parent / ".trt-cache"
                os.makedirs(cache, exist_ok=True)
                extra = {**tensorrt_provider_options(trt_shapes, cache), **extra}
            provider_options.append(extra)
        try:
            self._session = ort.InferenceSession(
                str(graph), session_options, providers=providers, provider_options=provider_options
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"cannot load {graph}: {exc}") from exc
        self.provider = self._session.get_providers()[0]
        if self.provider != providers[0]:
            message = (
                f"{graph.name}: {providers[0]} failed to initialise, running on {self.provider}"
            )
            if warn_on_fallback:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            else:
                log.info(message)
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, feeds)[0]


def device_kind(providers: list[str]) -> str:
    """Device class of the first provider: "gpu" (TensorRT/CUDA), "openvino" or "cpu"."""
    if providers[0] == OPENVINO:
        return "openvino"
    return "gpu" if providers[0] in GPU_PROVIDERS else "cpu"
