"""OpenVINO CPU backend: one compiled model per tower behind the `TowerSession` interface.

Why: on x86 CPUs without an NVIDIA GPU, OpenVINO runs the bundle's ONNX graphs in bf16 (AMX,
or AVX512-BF16 as on AMD Zen 4) with fused attention, runs NNCF int8 IR graphs on VNNI/AMX,
and takes dynamic shapes without compiling per shape. OpenVINO is an optional extra, imported
only when this backend is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.manifest import BundleError
from ..errors import OptionError
from .session import NO_LIMITS

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'clipedge[openvino]'"
PRECISIONS = ("bf16", "f32")


MODES = ("latency", "throughput")


@dataclass(frozen=True)
class OpenVinoOptions:
    """OpenVINO settings: `inference_precision` for float graphs ("bf16" or "f32"; int8 IR
    runs its int8 parts either way), `threads` (None: all cores), `mode` "latency" (one
    request on every core: the fastest single call) or "throughput" (OpenVINO's streams: a
    batch is split over several requests run at once, for batch jobs), `cache` of compiled
    models (a restart imports instead of compiling: seconds -> well under one) in `cache_dir`
    (None: `default_cache_dir` for the graph), `properties` raw OpenVINO properties that win
    over these."""

    threads: int | None = None
    inference_precision: str = "bf16"
    mode: str = "latency"
    cache: bool = True
    cache_dir: Path | None = None
    properties: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.inference_precision not in PRECISIONS:
            raise OptionError(f"inference_precision must be one of {PRECISIONS}")
        if self.mode not in MODES:
            raise OptionError(f"mode must be one of {MODES}")


def config_key(config: dict[str, str]) -> str:
    """A short stable name for a compile config."""
    text = ";".join(f"{k}={v}" for k, v in sorted(config.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir(graph: Path, openvino_version: str) -> Path:
    """Per-user folder for one bundle's compiled models: `$CLIPEDGE_CACHE_DIR`, else
    `$XDG_CACHE_HOME/clipedge` (default `~/.cache/clipedge`), then `openvino/<OpenVINO
    version>/<bundle hash>`. The bundle hash is that of its manifest, which lists every file's
    sha256 (a graph outside a bundle: its path, size and time instead), so a changed bundle
    or OpenVINO never meets a stale blob, and old ones can be deleted by folder."""
    root = os.environ.get("CLIPEDGE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "clipedge"
    )
    manifest = graph.parent / "clipedge.json"
    if manifest.is_file():
        key = hashlib.sha256(manifest.read_bytes()).hexdigest()
    else:
        stat = graph.stat()
        key = hashlib.sha256(f"{graph.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        key = key.hexdigest()
    version = openvino_version.split("-")[0]
    return Path(root) / "openvino" / version / key[:16]


def openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def import_openvino() -> Any:
    """The `openvino` module, or an ImportError that says how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(f"the openvino backend needs OpenVINO: {INSTALL_HINT}") from exc
    return openvino


def compile_config(
    inference_precision: str,
    threads: int | None,
    overrides: dict[str, str] | None = None,
    mode: str = "latency",
) -> dict[str, str]:
    """CPU plugin properties: the performance hint of `mode`, the given precision.

    bf16 falls back to f32 on CPUs without bf16 support (OpenVINO decides); `overrides` are
    raw OpenVINO property names and values and win over the defaults.
    """
    config = {"PERFORMANCE_HINT": mode.upper(), "INFERENCE_PRECISION_HINT": inference_precision}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return {**config, **(overrides or {})}


class OpenVinoSession:
    """A compiled OpenVINO model for one graph (ONNX or OpenVINO IR); thread-safe `run`.

    Each calling thread gets its own infer request, so concurrent calls never share buffers.
    """

    def __init__(
        self, graph: Path, options: OpenVinoOptions | None = None, device: str = "CPU"
    ) -> None:
        options = options or OpenVinoOptions()
        ov = import_openvino()
        config = compile_config(
            options.inference_precision, options.threads, options.properties, options.mode
        )
        core = ov.Core()
        if options.cache:
            root = options.cache_dir or default_cache_dir(Path(graph), ov.get_version())
            # OpenVINO 2026.4's CPU cache key leaves out INFERENCE_PRECISION_HINT: a bf16
            # compile imported the f32 blob of the same graph and returned wrong values and
            # NaN (measured). One folder per compile config keeps them apart.
            cache = Path(root) / config_key(config)
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(cache)})
            except OSError as exc:  # a read-only home: compile every time, say why once
                log.warning("OpenVINO model cache off: cannot create %s: %s", cache, exc)
        try:
            # A path (not a read model) lets OpenVINO skip reading the graph on a cache hit.
            self._compiled = core.compile_model(str(graph), device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
            raise BundleError(f"cannot load {graph} in OpenVINO: {exc}") from exc
        precision = self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.provider = f"OpenVINO-{device} {precision}"
        self.limits = NO_LIMITS
        self.input_names = [port.any_name for port in self._compiled.inputs]
        self._output = self._compiled.output(0)
        self._local = threading.local()
        # Throughput mode: as many concurrent requests as OpenVINO made streams.
        self.streams = (
            int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            if options.mode == "throughput"
            else 1
        )
        self._queue_lock = threading.Lock()
        self._queue = ov.AsyncInferQueue(self._compiled, self.streams) if self.streams > 1 else None

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        return request

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(feeds.values())))
        if self.streams > 1 and rows > 1:
            return self._run_split(feeds, rows)
        # share_outputs=False copies the result out of the request's buffer, which the
        # thread's next call overwrites.
        result = self._request().infer(feeds, share_inputs=True, share_outputs=False)
        return result[self._output]

    def close(self) -> None:
        """Drop the compiled model (OpenVINO frees it with the last reference)."""
        self._queue = None
        self._compiled = None

    def _run_split(self, feeds: dict[str, np.ndarray], rows: int) -> np.ndarray:
        """One batch over the streams: contiguous slices run at once, joined in order."""
        bounds = np.linspace(0, rows, min(self.streams, rows) + 1).astype(int)
        parts: list[Any] = [None] * (len(bounds) - 1)

        def done(request: Any, index: int) -> None:
            parts[index] = request.get_tensor(self._output).data.copy()

        # One queue at a time: a second caller waits rather than oversubscribing the cores.
        with self._queue_lock:
            self._queue.set_callback(done)
            for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                self._queue.start_async({k: v[start:stop] for k, v in feeds.items()}, index)
            self._queue.wait_all()
        return np.concatenate(parts)
