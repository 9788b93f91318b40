"""Native TensorRT engines (`backend="tensorrt-native"`): TensorRT's own runtime, no
onnxruntime, no torch, no pycuda.

- The TensorRT 10 execution API, which TensorRT 10.3 (JetPack 6), 10.13, 11 and TensorRT for
  RTX share: `set_optimization_profile_async`, `set_input_shape`, `set_tensor_address`,
  `execute_async_v3`.
- Device buffers, pinned host buffers and one stream per execution context through
  `cuda-bindings` (the CUDA runtime API), sized once by `tensorrt_engines.buffer_plan`.
- The profile is picked by shape (the smallest sequence bucket that holds the batch) and a
  batch above the profile's maximum is split (`tensorrt_engines.choose_profile`,
  `split_batch`).
- One execution context per concurrent caller: contexts are pooled, created on demand up to
  `TensorrtOptions.max_contexts`; a caller beyond that waits for a free one.
- `close()` releases every context, buffer and stream (also at garbage collection).
- The engine is chosen from the bundle's manifest (`tensorrt_engines.choose_engine`): an engine
  built for another GPU, TensorRT version, platform or source graph is never deserialised; the
  session refuses with every reason, or rebuilds with `TensorrtOptions(rebuild=True)`.

CUDA and TensorRT are imported when the first session is made, not by `import clipedge`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.manifest import BundleError, Manifest, TowerManifest, read_manifest
from ..errors import OptionError
from .session import EngineLimits
from .tensorrt_engines import (
    EngineEntry,
    Machine,
    buffer_plan,
    choose_engine,
    choose_profile,
    current_platform,
    runnable_precisions,
    split_batch,
)

log = logging.getLogger(__name__)

# The runtime module per engine flavour, best first. The lean runtime (tensorrt_lean) runs
# version-compatible engines only; JetPack and the full wheels give `tensorrt`.
RUNTIME_MODULES = {
    "tensorrt": ("tensorrt", "tensorrt_lean"),
    "tensorrt_rtx": ("tensorrt_rtx",),
}
# Every TensorRT attribute this backend uses (tests check them on the real classes).
TRT_API = {
    "module": ("Logger", "Runtime", "TensorIOMode", "DataType", "nptype"),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": (
        "num_io_tensors",
        "get_tensor_name",
        "get_tensor_mode",
        "get_tensor_dtype",
        "num_optimization_profiles",
        "get_tensor_profile_shape",
        "create_execution_context",
    ),
    "IExecutionContext": (
        "set_optimization_profile_async",
        "set_input_shape",
        "set_tensor_address",
        "get_tensor_shape",
        "execute_async_v3",
    ),
}
CUDA_API = (
    "cudaGetDeviceCount",
    "cudaGetDeviceProperties",
    "cudaSetDevice",
    "cudaMalloc",
    "cudaFree",
    "cudaMallocHost",
    "cudaFreeHost",
    "cudaMemcpyAsync",
    "cudaMemcpyKind",
    "cudaStreamCreate",
    "cudaStreamDestroy",
    "cudaStreamSynchronize",
    "cudaGetErrorString",
    "cudaError_t",
)


@dataclass(frozen=True)
class TensorrtOptions:
    """Native TensorRT settings: `device` (CUDA ordinal), `max_contexts` concurrent callers
    (one execution context, stream and buffer set each), `rebuild`: build a matching engine
    into the bundle when none runs here (needs a TensorRT builder; minutes on a Jetson).
    `threads` is accepted for the common load() signature and unused (the GPU runs)."""

    device: int = 0
    max_contexts: int = 2
    rebuild: bool = False
    workspace_gb: float = 4.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.max_contexts < 1:
            raise OptionError("max_contexts must be >= 1")


# ----- CUDA through cuda-bindings ---------------------------------------------------------


def cudart() -> Any:
    """The CUDA runtime API of cuda-bindings (`cuda.bindings.runtime`, or `cuda.cudart` in
    cuda-python < 12.6)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def _check(result: Any) -> Any:
    """Unpack a cuda-bindings call result `(error, *values)`, raising on an error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    rt = cudart()
    if error != rt.cudaError_t.cudaSuccess:
        _, message = rt.cudaGetErrorString(error)
        text = message.decode() if isinstance(message, bytes) else str(message)
        raise RuntimeError(f"CUDA error {error}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def stream_handle(stream: Any) -> int:
    """The integer handle TensorRT takes for a cuda-bindings `cudaStream_t`."""
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


def query_gpu(device: int = 0) -> tuple[str | None, str | None]:
    """(name, "major.minor") of a CUDA device; (None, None) when cuda-bindings, the driver or
    the device is missing (CUDA reports an error code there, no crash)."""
    try:
        rt = cudart()
        count = _check(rt.cudaGetDeviceCount())
        if count is None or device >= count:
            return None, None
        props = _check(rt.cudaGetDeviceProperties(device))
    except Exception as exc:  # ImportError, a missing driver library, a CUDA error
        log.debug("no usable CUDA device: %s", exc)
        return None, None
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else props.name
    return name.strip("\x00").strip(), f"{props.major}.{props.minor}"


def installed_flavours() -> dict[str, str]:
    """TensorRT runtimes importable here: flavour -> version (the full and lean runtimes
    both count as "tensorrt"; the lean one only runs version-compatible engines)."""
    found: dict[str, str] = {}
    for flavour, modules in RUNTIME_MODULES.items():
        for name in modules:
            try:
                module = importlib.import_module(name)
            except Exception:  # ImportError or a library that cannot load
                continue
            found[flavour] = str(getattr(module, "__version__", "?"))
            break
    return found


@functools.cache
def this_machine(device: int = 0) -> Machine:
    """What runs engines here (cached: the GPU does not change within a process). TensorRT
    is imported only when there is a GPU."""
    name, capability = query_gpu(device)
    flavours = installed_flavours() if capability is not None else {}
    return Machine(flavours, name, capability, current_platform())


def available() -> bool:
    """A TensorRT runtime and a CUDA GPU are here (the bundle's engines are checked by
    `bundle_engines_run_here`)."""
    machine = this_machine()
    return bool(machine.flavours) and machine.compute_capability is not None


def runnable(manifest: Manifest) -> dict[str, list[str]]:
    """Per tower, the precisions with an engine that runs here. Free for bundles without
    engines (CUDA and TensorRT are not touched)."""
    if not any(tower.tensorrt_engines for tower in manifest.towers.values()):
        return {name: [] for name in manifest.towers}
    machine = this_machine()
    return {
        name: runnable_precisions(tower, machine, manifest.files)
        for name, tower in manifest.towers.items()
    }


def bundle_engines_run_here(manifest: Manifest) -> bool:
    """Every tower has at least one engine that runs on this machine."""
    found = runnable(manifest)
    return bool(found) and all(found.values())


# ----- one execution context -------------------------------------------------------------


class _HostBuffer:
    """Pinned host memory viewed as a flat byte array."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.pointer = _check(cudart().cudaMallocHost(nbytes))
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.pointer))

    def free(self) -> None:
        if self.pointer:
            _check(cudart().cudaFreeHost(self.pointer))
            self.pointer = 0


class _Context:
    """An execution context with its own stream and buffers (one caller at a time)."""

    def __init__(
        self,
        engine: Any,
        sizes: dict[str, int],
        dtypes: dict[str, np.dtype],
        inputs: list[str],
        outputs: list[str],
    ) -> None:
        rt = cudart()
        self.dtypes = dtypes
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BundleError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = _check(rt.cudaStreamCreate())
        self.device = {name: _check(rt.cudaMalloc(max(size, 1))) for name, size in sizes.items()}
        self.host = {name: _HostBuffer(max(size, 1)) for name, size in sizes.items()}
        self.inputs, self.outputs = inputs, outputs
        self.profile = -1
        for name, pointer in self.device.items():
            self.context.set_tensor_address(name, int(pointer))

    def run(self, profile: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rt = cudart()
        kind = rt.cudaMemcpyKind
        if profile != self.profile:
            if not self.context.set_optimization_profile_async(profile, stream_handle(self.stream)):
                raise RuntimeError(f"TensorRT refused optimisation profile {profile}")
            self.profile = profile
            for name, pointer in self.device.items():  # addresses are per profile
                self.context.set_tensor_address(name, int(pointer))
        for name in self.inputs:
            array = np.ascontiguousarray(feeds[name])
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise ValueError(f"shape {array.shape} of {name} is outside profile {profile}")
            self.host[name].array[: array.nbytes] = array.view(np.uint8).reshape(-1)
            _check(
                rt.cudaMemcpyAsync(
                    self.device[name],
                    self.host[name].pointer,
                    array.nbytes,
                    kind.cudaMemcpyHostToDevice,
                    self.stream,
                )
            )
        if not self.context.execute_async_v3(stream_handle(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        shapes = {name: tuple(self.context.get_tensor_shape(name)) for name in self.outputs}
        for name in self.outputs:
            nbytes = int(np.prod(shapes[name])) * self.dtypes[name].itemsize
            _check(
                rt.cudaMemcpyAsync(
                    self.host[name].pointer,
                    self.device[name],
                    nbytes,
                    kind.cudaMemcpyDeviceToHost,
                    self.stream,
                )
            )
        _check(rt.cudaStreamSynchronize(self.stream))
        result = {}
        for name in self.outputs:
            dtype = self.dtypes[name]
            count = int(np.prod(shapes[name]))
            flat = self.host[name].array[: count * dtype.itemsize].view(dtype)
            result[name] = flat.reshape(shapes[name]).copy()
        return result

    def close(self) -> None:
        rt = cudart()
        self.context = None
        for pointer in self.device.values():
            _check(rt.cudaFree(pointer))
        self.device = {}
        for buffer in self.host.values():
            buffer.free()
        self.host = {}
        if self.stream is not None:
            _check(rt.cudaStreamDestroy(self.stream))
            self.stream = None


# ----- the session -----------------------------------------------------------------------


def import_runtime(entry: EngineEntry) -> Any:
    """The TensorRT runtime module for the engine's flavour (lean only for engines built
    version-compatible)."""
    errors = []
    for name in RUNTIME_MODULES[entry.flavour]:
        if name == "tensorrt_lean" and not entry.version_compatible:
            continue
        try:
            return importlib.import_module(name)
        except Exception as exc:
            errors.append(f"{name}: {exc}")
    raise BundleError(f"no runtime for {entry.file} ({entry.flavour}): {'; '.join(errors)}")


class TensorrtSession:
    """One tower's native engine (thread-safe `run`; `close()` frees GPU memory)."""

    def __init__(self, engine_path: Path, entry: EngineEntry, options: TensorrtOptions) -> None:
        self.entry = entry
        self.options = options
        self.provider = f"{entry.flavour} {entry.tensorrt_version} native ({entry.file})"
        _check(cudart().cudaSetDevice(options.device))
        trt = import_runtime(entry)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if entry.version_compatible and hasattr(self._runtime, "engine_host_code_allowed"):
            # a version-compatible engine carries its own lean runtime (host code)
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise BundleError(
                f"TensorRT could not deserialise {engine_path.name} (its log says why); rebuild "
                f"it: clipedge build-engine {engine_path.parent} --precision {entry.precision}"
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self._engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self._engine.get_tensor_mode(n) != mode]
        self.dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        specs = {t["name"]: t for t in (*entry.inputs, *entry.outputs)}
        tensors = {}
        for name in names:
            shape = specs.get(name, {}).get("shape") or []
            symbolic = ["batch" if i == 0 else "sequence" for i in range(len(shape))]
            manifest_shape = [
                d if isinstance(d, int) and d >= 0 else symbolic[i] for i, d in enumerate(shape)
            ]
            tensors[name] = (self.dtypes[name].name, manifest_shape)
        self.sizes = buffer_plan(entry.profiles, tensors)
        lengths = [p.max_length for p in entry.profiles if p.max_length is not None]
        self.limits = EngineLimits(max_length=max(lengths) if lengths else None)
        self._pool: queue.LifoQueue[_Context] = queue.LifoQueue()
        self._created = 0
        self._lock = threading.Lock()
        self._contexts: list[_Context] = []
        self._closed = False

    def _borrow(self) -> _Context:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise RuntimeError("the TensorRT session is closed")
            if self._created < self.options.max_contexts:
                self._created += 1
                context = _Context(self._engine, self.sizes, self.dtypes, self.inputs, self.outputs)
                self._contexts.append(context)
                return context
        return self._pool.get()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        first = feeds[self.inputs[0]]
        length = int(first.shape[1]) if first.ndim == 2 else None
        profile_index = choose_profile(self.entry.profiles, length)
        profile = self.entry.profiles[profile_index]
        typed = {name: feeds[name].astype(self.dtypes[name], copy=False) for name in self.inputs}
        parts = []
        for part in split_batch(int(first.shape[0]), profile.max_batch):
            context = self._borrow()
            try:
                out = context.run(profile_index, {k: v[part] for k, v in typed.items()})
            finally:
                self._pool.put(context)
            parts.append(out[self.outputs[0]])
        result = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return result.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free every context's GPU and pinned memory and its stream, then the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for context in self._contexts:
                context.close()
            self._contexts = []
            self._engine = None
            self._runtime = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: CUDA may be gone
            self.close()


def open_session(
    graph: Path, tower: TowerManifest, options: TensorrtOptions | None, quiet: bool
) -> TensorrtSession:
    """The registry's opener: the engine of the bundle for this tower and the graph's
    precision that runs here; rebuilt when `options.rebuild`, else a BundleError saying why."""
    options = options or TensorrtOptions()
    bundle_dir = graph.parent
    manifest = read_manifest(bundle_dir)
    tower_name = next(n for n, t in manifest.towers.items() if t.graphs == tower.graphs)
    precision = next(p for p, g in tower.graphs.items() if g.file == graph.name)
    machine = this_machine(options.device)
    choice = choose_engine(tower, precision, machine, manifest.files)
    if choice.entry is None and options.rebuild:
        from .tensorrt_build import BuildOptions, build_engines

        log.warning("building the %s %s TensorRT engine (no matching one)", tower_name, precision)
        build_engines(
            bundle_dir,
            [tower_name],
            BuildOptions(precision=precision, workspace_gb=options.workspace_gb),
            report=log.info,
        )
        manifest = read_manifest(bundle_dir)
        tower = manifest.towers[tower_name]
        choice = choose_engine(tower, precision, machine, manifest.files)
    if choice.entry is None:
        raise BundleError(choice.explain(tower_name, precision).replace("BUNDLE", str(bundle_dir)))
    return TensorrtSession(bundle_dir / choice.entry.file, choice.entry, options)
