"""onnxruntime sessions (CPU, CUDA and TensorRT execution providers) for one tower's graph.

onnxruntime is imported when the first session is made, not by `import clipedge`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.manifest import BundleError, TowerManifest
from ..errors import OptionError
from ..user_warnings import warn
from .profiles import ProfileLimits, tower_profile
from .session import NO_LIMITS, EngineLimits

log = logging.getLogger(__name__)

OPT_LEVELS = {"disable": 0, "basic": 1, "extended": 2, "all": 99}
# Providers per backend name, best first; onnxruntime runs each node on the first that can.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True)
class OnnxruntimeOptions:
    """onnxruntime settings: `threads` intra-op threads (None: one per physical core),
    `optimization` one of OPT_LEVELS, `provider_options` raw options per provider name,
    `cpu_arena` onnxruntime's CPU memory arena (None: off for graphs whose shapes vary with
    text length, on for fixed shapes: the arena keeps the largest run's memory for good,
    e.g. +560 MB held after one 4096-token text on the tiny bundle; without it memory
    returns after the run, measured faster than the arena-shrinkage run option),
    `memory_reuse` the allocation planner's buffer reuse (None: off on the CPU provider, on
    for GPU providers: its plan hands a freed buffer to a later tensor and so keeps buffers
    alive past their last use; off, one 8192-token full-size text peaks at +0.46 GB over the
    loaded model instead of +1.40 GB, 32 images at +3.2 GB instead of +8.4 GB, at 0-12 % more
    time on a first call; see docs/benchmarks.md), `spinning` whether idle intra-op threads
    spin-wait for work (None: off on the CPU provider, on for GPU providers: spinning threads
    hold cores that the other tower, the server's preparation or another process needs; in
    `clipedge serve` at full size on 2 vCPUs, short-text p99 1.43-1.63 s -> 1.00 s, see
    docs/benchmarks.md)."""

    threads: int | None = None
    optimization: str = "all"
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    cpu_arena: bool | None = None
    memory_reuse: bool | None = None
    spinning: bool | None = None

    def __post_init__(self) -> None:
        if self.optimization not in OPT_LEVELS:
            raise OptionError(f"optimization must be one of {list(OPT_LEVELS)}")


@dataclass(frozen=True)
class TensorrtEpOptions(OnnxruntimeOptions):
    """onnxruntime's TensorRT provider: the engines' profile limits and their on-disk cache
    (default: `.trt-cache` beside the graph)."""

    limits: ProfileLimits = field(default_factory=ProfileLimits)
    cache_dir: Path | None = None


def provider_available(backend: str) -> bool:
    """Whether this onnxruntime build lists the backend's first provider."""
    import onnxruntime as ort

    return PROVIDERS[backend][0] in ort.get_available_providers()


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
    """An onnxruntime InferenceSession for one graph (thread-safe `run`).

    `backend` is "cpu", "cuda" or "tensorrt"; providers this onnxruntime build lacks are left
    out. With TensorRT, `tower` gives the dynamic-shape profile (from `options.limits`).
    `warn_on_fallback=False` (backend "auto") logs instead of warning when the first provider
    cannot start, e.g. onnxruntime-gpu lists TensorRT without its libraries.
    """

    def __init__(
        self,
        graph: Path,
        backend: str = "cpu",
        options: OnnxruntimeOptions | None = None,
        tower: TowerManifest | None = None,
        warn_on_fallback: bool = True,
    ) -> None:
        import onnxruntime as ort

        options = options or OnnxruntimeOptions()
        available = set(ort.get_available_providers())
        providers = [p for p in PROVIDERS[backend] if p in available]
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel(
            OPT_LEVELS[options.optimization]
        )
        if options.threads is not None:
            session_options.intra_op_num_threads = options.threads
        varying = tower is not None and any(spec.name == "input_ids" for spec in tower.inputs)
        arena = options.cpu_arena if options.cpu_arena is not None else not varying
        session_options.enable_cpu_mem_arena = arena
        gpu = providers[0] in GPU_PROVIDERS
        reuse = options.memory_reuse if options.memory_reuse is not None else gpu
        session_options.enable_mem_reuse = reuse
        spinning = options.spinning if options.spinning is not None else gpu
        session_options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        if gpu:
            preload_cuda_libraries()
        provider_options = [dict(options.provider_options.get(p, {})) for p in providers]
        if providers[0] == "TensorrtExecutionProvider" and isinstance(options, TensorrtEpOptions):
            if tower is None:
                raise ValueError("the TensorRT provider needs the tower for its shape profile")
            cache = options.cache_dir or graph.parent / ".trt-cache"
            os.makedirs(cache, exist_ok=True)
            profile = tower_profile(tower, options.limits)
            provider_options[0] = {
                **tensorrt_provider_options(profile, cache),
                **provider_options[0],
            }
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
                warn(message, RuntimeWarning)
            else:
                log.info(message)
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.limits = NO_LIMITS
        if self.provider == "TensorrtExecutionProvider" and isinstance(options, TensorrtEpOptions):
            self.limits = EngineLimits(options.limits.max_batch, options.limits.max_length)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run(None, feeds)[0]

    def close(self) -> None:
        self._session = None
