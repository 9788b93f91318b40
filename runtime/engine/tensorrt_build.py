"""Native TensorRT engines for a bundle's towers (`clipedge build-engine`).

Written to the builder API that TensorRT 10.3 (JetPack 6), 10.13 (JetPack 7), TensorRT 11
and TensorRT for RTX share:
- a strongly typed network (the creation flag where it exists; TensorRT 11 removed the FP16 /
  INT8 builder flags and the calibrator): precision comes from the graph, so the `fp16`
  graph builds an fp16 engine and the Q/DQ `int8` graph an int8 one;
- the graph parsed from its file path, so external weights (`text.onnx.data`) resolve;
- optimisation profiles from the manifest (`tensorrt_engines.tower_profiles`): vision by
  batch, text by batch and sequence-length bucket;
- builder optimisation level, timing cache (read and written back), workspace limit,
  optionally version-compatible engines (lean runtime).

The int8 text graph stores its 250002 x 1024 embedding as int8 rows, gathered then cast and
scaled: TensorRT refuses a quantised constant anywhere but before a DequantizeLinear
("Quantized constant ... is only allowed before DQ"). `rewrite_int8_embeddings` turns it into
DequantizeLinear(table, per-row scale, axis 0) -> Gather, which TensorRT runs as an int8
gather. onnxruntime would de-quantise the whole table on every call in that form, so the
rewrite is applied to a temporary copy for TensorRT only, never to the shipped graph.

With full TensorRT the engine is built for the GPU of this machine; TensorRT for RTX builds
without a GPU (for RTX-class GPUs, `--compute-capability`), which is how the test suite
builds every graph of the tiny bundle on a CPU-only machine.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from ..bundle.manifest import BundleError, Manifest, read_manifest, sha256_file
from ..errors import BackendError
from .tensorrt_engines import (
    EngineEntry,
    EngineProfile,
    current_platform,
    engine_file_name,
    parse_profiles,
    tower_profiles,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_OPT_LEVEL = 3
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32"}


class BuilderUnavailable(BackendError):
    """No TensorRT builder (full TensorRT or TensorRT for RTX) is installed."""


def import_builder(flavour: str | None = None) -> tuple[Any, str]:
    """The TensorRT module with a builder and its flavour: full `tensorrt` first (engines for
    this GPU), else `tensorrt_rtx`. The lean / dispatch runtimes have no builder."""
    names = [flavour] if flavour else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a library that fails to load
            errors.append(f"{name}: {exc}")
            continue
        if hasattr(module, "Builder") and hasattr(module, "OnnxParser"):
            return module, name
        errors.append(f"{name}: has no Builder / OnnxParser")
    raise BuilderUnavailable(
        "no TensorRT builder here (" + "; ".join(errors) + "). Install JetPack's tensorrt on "
        "a Jetson, `tensorrt-cu12`/`tensorrt-cu13` for a data-centre GPU, or "
        "`tensorrt-rtx-cu13` to build for RTX GPUs (works without a GPU)"
    )


# ----- the int8 embedding rewrite --------------------------------------------------------


def rewrite_int8_embeddings(model: onnx.ModelProto) -> int:
    """Gather(table_int8, ids) -> Cast -> Mul(·, Gather(row_scale, ids)) becomes
    DequantizeLinear(table_int8, row_scale, axis=0) -> Gather(·, ids), in place.

    Only graph structure and the scale's dims change (a [V, 1] scale becomes [V]: same
    bytes), so external data stays where it is. Returns the number of tables rewritten.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    rewritten = 0
    for gather in list(graph.node):
        if gather.op_type != "Gather" or gather.input[0] not in initializers:
            continue
        table = initializers[gather.input[0]]
        if table.data_type != TensorProto.INT8 or len(table.dims) != 2:
            continue
        users = consumers.get(gather.output[0], [])
        if len(users) != 1 or users[0].op_type != "Cast":
            continue
        cast = users[0]
        muls = consumers.get(cast.output[0], [])
        if len(muls) != 1 or muls[0].op_type != "Mul":
            continue
        mul = muls[0]
        other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
        scale_gather = producers.get(other)
        if (
            scale_gather is None
            or scale_gather.op_type != "Gather"
            or scale_gather.input[1] != gather.input[1]
            or scale_gather.input[0] not in initializers
        ):
            continue
        scale = initializers[scale_gather.input[0]]
        if list(scale.dims) not in ([table.dims[0], 1], [table.dims[0]]):
            continue
        if len(consumers.get(scale_gather.output[0], [])) != 1:
            continue
        del scale.dims[:]
        scale.dims.extend([table.dims[0]])
        dequantized = gather.input[0] + "_dequantized"
        index = list(graph.node).index(gather)
        new_nodes = [
            helper.make_node(
                "DequantizeLinear",
                [gather.input[0], scale.name],
                [dequantized],
                axis=0,
                name=gather.name + "_trt_dequant",
            ),
            helper.make_node(
                "Gather", [dequantized, gather.input[1]], [mul.output[0]], axis=0, name=gather.name
            ),
        ]
        for node in (gather, cast, scale_gather, mul):
            graph.node.remove(node)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(index + offset, node)
        stale = {gather.output[0], cast.output[0], scale_gather.output[0], scale.name}
        for value in [v for v in graph.value_info if v.name in stale]:
            graph.value_info.remove(value)
        rewritten += 1
        log.info("TensorRT copy: %s de-quantised per row before its Gather", table.name)
    return rewritten


@contextlib.contextmanager
def tensorrt_graph(graph: Path, keep: bool = False) -> Iterator[Path]:
    """The path TensorRT parses: the graph itself, or a rewritten copy beside it (same
    directory, so its external data resolves): temporary, or `<name>.trt.onnx` with `keep`
    (for trtexec / polygraphy; never listed in the manifest)."""
    model = onnx.load(str(graph), load_external_data=False)
    if not rewrite_int8_embeddings(model):
        yield graph
        return
    if keep:
        copy = graph.with_name(graph.stem + ".trt.onnx")
    else:
        handle, name = tempfile.mkstemp(
            prefix=f".{graph.stem}.trt-", suffix=".onnx", dir=graph.parent
        )
        os.close(handle)
        copy = Path(name)
    try:
        onnx.save_model(model, str(copy))
        del model
        yield copy
    finally:
        if not keep:
            copy.unlink(missing_ok=True)


# ----- building --------------------------------------------------------------------------


@dataclass
class BuildOptions:
    precision: str = "fp16"
    profiles: str | None = None
    version_compatible: bool = False
    timing_cache: Path | None = None
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    optimization_level: int = DEFAULT_OPT_LEVEL
    flavour: str | None = None  # "tensorrt" or "tensorrt_rtx"; None: the first importable
    compute_capabilities: list[str] = field(default_factory=list)  # TensorRT for RTX only
    keep_graph: bool = False  # keep the rewritten int8 copy as <name>.trt.onnx


@dataclass
class BuildResult:
    tower: str
    entry: EngineEntry
    path: Path
    command: str
    seconds: float


def _gpu(trt_flavour: str) -> tuple[str | None, str | None]:
    """The GPU name and compute capability of device 0 through cuda-bindings (None, None
    when there is no usable GPU)."""
    from .tensorrt_backend import query_gpu

    return query_gpu()


def _dtype_name(dtype: Any) -> str:
    return TRT_DTYPES.get(getattr(dtype, "name", str(dtype)).upper(), str(dtype).lower())


def equivalent_command(
    graph: Path, engine: Path, profiles: list[EngineProfile], options: BuildOptions
) -> str:
    """The `trtexec` line for the same build (the `polygraphy convert` line follows it)."""

    def shapes(position: int, profile: EngineProfile) -> str:
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in triple[position])}"
            for name, triple in profile.shapes.items()
        )

    trtexec = ["trtexec", f"--onnx={graph}", f"--saveEngine={engine}", "--stronglyTyped"]
    polygraphy = ["polygraphy", "convert", str(graph), "-o", str(engine), "--strongly-typed"]
    for profile in profiles:
        trtexec += [f"--minShapes={shapes(0, profile)}", f"--optShapes={shapes(1, profile)}"]
        trtexec += [f"--maxShapes={shapes(2, profile)}"]
        for name, (low, opt, high) in profile.shapes.items():
            polygraphy += ["--trt-min-shapes", f"{name}:{low}".replace(" ", "")]
            polygraphy += ["--trt-opt-shapes", f"{name}:{opt}".replace(" ", "")]
            polygraphy += ["--trt-max-shapes", f"{name}:{high}".replace(" ", "")]
    workspace_mb = int(options.workspace_gb * 1024)
    trtexec += [f"--memPoolSize=workspace:{workspace_mb}M"]
    trtexec += [f"--builderOptimizationLevel={options.optimization_level}"]
    polygraphy += ["--pool-limit", f"workspace:{workspace_mb}M"]
    polygraphy += ["--builder-optimization-level", str(options.optimization_level)]
    if options.timing_cache:
        trtexec.append(f"--timingCacheFile={options.timing_cache}")
        polygraphy += ["--load-timing-cache", str(options.timing_cache)]
        polygraphy += ["--save-timing-cache", str(options.timing_cache)]
    if options.version_compatible:
        trtexec.append("--versionCompatible")
        polygraphy.append("--version-compatible")
    return shlex.join(trtexec) + "\n" + shlex.join(polygraphy)


def build_tower_engine(
    bundle_dir: Path,
    manifest: Manifest,
    tower_name: str,
    options: BuildOptions,
    report: Callable[[str], None] = print,
) -> BuildResult:
    """Build one engine for one tower and precision and write it into the bundle (the
    manifest is updated by the caller, `build_engines`)."""
    trt, flavour = import_builder(options.flavour)
    if tower_name not in manifest.towers:
        raise BundleError(f"the bundle has no {tower_name} tower")
    tower = manifest.towers[tower_name]
    if options.precision not in tower.graphs:
        raise BundleError(
            f"the bundle has no {options.precision} {tower_name} graph (has "
            f"{', '.join(tower.graphs)}); calibrate it first: clipedge calibrate BUNDLE "
            f"--precisions {options.precision} ..."
        )
    graph_entry = tower.graphs[options.precision]
    if graph_entry.device in ("cpu", "openvino"):
        raise BundleError(f"{graph_entry.file} is a {graph_entry.device} graph, not for TensorRT")
    graph = bundle_dir / graph_entry.file
    profiles = tower_profiles(tower, parse_profiles(options.profiles, tower_name), tower_name)
    version = str(getattr(trt, "__version__", "?"))
    gpu_name, capability = (None, None)
    if flavour == "tensorrt":
        gpu_name, capability = _gpu(flavour)
        if capability is None:
            raise BuilderUnavailable(
                "TensorRT builds engines for the GPU it runs on and none is usable here; "
                "use TensorRT for RTX (tensorrt-rtx-cu13) to build for RTX GPUs without one"
            )
        capabilities = [capability]
        target = f"{version}-sm{capability.replace('.', '')}"
    else:
        capabilities = list(options.compute_capabilities)
        target = (
            "sm" + "-".join(c.replace(".", "") for c in capabilities) if capabilities else "rtx"
        )
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    with tensorrt_graph(graph, options.keep_graph) as parsed:
        rewritten = parsed != graph
        if not parser.parse_from_file(str(parsed)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"TensorRT cannot parse {graph.name}: {errors}")
        for profile in profiles:
            trt_profile = builder.create_optimization_profile()
            for name, (low, opt, high) in profile.shapes.items():
                trt_profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(trt_profile)
        config.set_memory_pool_limit(
            trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30))
        )
        config.builder_optimization_level = options.optimization_level
        if options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if capabilities and flavour == "tensorrt_rtx":
            config.num_compute_capabilities = len(capabilities)
            for i, cc in enumerate(capabilities):
                member = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""))
                config.set_compute_capability(member, i)
        cache = None
        if options.timing_cache is not None and flavour == "tensorrt_rtx":
            report("[build-engine] TensorRT for RTX has no timing cache (its builds are JIT-tuned)")
        elif options.timing_cache is not None:
            blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, False)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(
            f"TensorRT ({flavour} {version}) could not build {graph.name}; its log above says "
            "why (a workspace limit too small for the largest profile is a common cause)"
        )
    seconds = time.perf_counter() - started
    if cache is not None and options.timing_cache is not None:
        options.timing_cache.write_bytes(bytes(cache.serialize()))
    name = engine_file_name(tower_name, options.precision, flavour, target)
    path = bundle_dir / name
    path.write_bytes(bytes(serialized))

    def io(tensors: list[Any]) -> list[dict[str, Any]]:
        return [
            {"name": t.name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for t in tensors
        ]

    entry = EngineEntry(
        file=name,
        precision=options.precision,
        graph=graph_entry.file,
        graph_sha256=manifest.files.get(graph_entry.file, {}).get("sha256") or sha256_file(graph),
        profiles=profiles,
        flavour=flavour,
        tensorrt_version=version,
        version_compatible=options.version_compatible,
        gpu_name=gpu_name,
        compute_capabilities=capabilities,
        platform=current_platform(),
        inputs=io([network.get_input(i) for i in range(network.num_inputs)]),
        outputs=io([network.get_output(i) for i in range(network.num_outputs)]),
        builder_optimization_level=options.optimization_level,
        bytes=path.stat().st_size,
        build_seconds=round(seconds, 2),
    )
    command = equivalent_command(graph, path, profiles, options)
    if rewritten and not options.keep_graph:
        command = (
            f"# {graph.name} needs the TensorRT-only int8 embedding rewrite first: "
            f"--keep-graph writes it as {graph.stem}.trt.onnx; use that path below\n{command}"
        )
    elif rewritten:
        command = equivalent_command(
            graph.with_name(graph.stem + ".trt.onnx"), path, profiles, options
        )
    report(
        f"[build-engine] {tower_name} {options.precision}: {name} ({entry.bytes / 1e6:.1f} MB, "
        f"{seconds:.1f} s, {flavour} {version}, {len(profiles)} profile(s))"
    )
    return BuildResult(tower_name, entry, path, command, seconds)


def record_engine(bundle_dir: Path, manifest: Manifest, result: BuildResult) -> Manifest:
    """Add (or replace, by file name) the engine's entry and its file to the manifest."""
    tower = manifest.towers[result.tower]
    entries = [e for e in tower.tensorrt_engines if e.get("file") != result.entry.file]
    tower.tensorrt_engines[:] = [*entries, result.entry.to_dict()]
    manifest.files[result.entry.file] = {
        "bytes": result.path.stat().st_size,
        "sha256": sha256_file(result.path),
    }
    manifest.save(bundle_dir)
    return manifest


def build_engines(
    bundle_dir: str | os.PathLike[str],
    towers: list[str] | None = None,
    options: BuildOptions | None = None,
    report: Callable[[str], None] = print,
) -> list[BuildResult]:
    """Build the engine of each tower (one at a time, so peak memory is one tower's) and
    record it in the bundle's manifest."""
    bundle_dir = Path(bundle_dir)
    options = options or BuildOptions()
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {options.precision!r}")
    manifest = read_manifest(bundle_dir)
    results = []
    for tower_name in towers or list(manifest.towers):
        result = build_tower_engine(bundle_dir, manifest, tower_name, options, report)
        manifest = record_engine(bundle_dir, manifest, result)
        report("[build-engine] the same build with trtexec / polygraphy:\n" + result.command)
        results.append(result)
    return results


# ----- ahead-of-time engines for onnxruntime's TensorRT provider (EPContext) ---------------


def ep_context_provider_options(
    profiles: list[EngineProfile], context_path: Path, cache_dir: Path
) -> dict[str, str]:
    """onnxruntime TensorRT EP options that build every profile and dump an EPContext graph.

    Every dynamic input is in every profile option (the provider otherwise builds the missing
    ones for the first shape it sees and rebuilds later); several profiles repeat the input
    name, as the provider's documentation describes. `trt_ep_context_embed_mode` 0 keeps the
    engine in its own file beside the context graph.
    """

    def shapes(position: int) -> str:
        return ",".join(
            f"{name}:{'x'.join(str(d) for d in triple[position])}"
            for profile in profiles
            for name, triple in profile.shapes.items()
        )

    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": shapes(0),
        "trt_profile_opt_shapes": shapes(1),
        "trt_profile_max_shapes": shapes(2),
        "trt_dump_ep_context_model": "True",
        "trt_ep_context_file_path": str(context_path),
        "trt_ep_context_embed_mode": "0",
    }


def build_ep_context(
    bundle_dir: str | os.PathLike[str],
    tower_name: str,
    precision: str = "fp16",
    profiles: str | None = None,
    report: Callable[[str], None] = print,
) -> Path:
    """Build the tower's engines with onnxruntime's TensorRT provider and write the EPContext
    graph (`<graph>.ep_context.onnx`, the engine beside it) into the bundle, so a user can ship
    pre-built engines with the ONNX graphs. Needs a GPU, onnxruntime-gpu and TensorRT."""
    import onnxruntime as ort

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    tower = manifest.towers[tower_name]
    if precision not in tower.graphs:
        raise BundleError(f"the bundle has no {precision} {tower_name} graph")
    graph = bundle_dir / tower.graphs[precision].file
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise BuilderUnavailable("onnxruntime's TensorRT provider is not in this onnxruntime")
    engine_profiles = tower_profiles(tower, parse_profiles(profiles, tower_name), tower_name)
    context = graph.with_name(graph.stem + ".ep_context.onnx")
    options = ep_context_provider_options(engine_profiles, context, bundle_dir)
    started = time.perf_counter()
    session = ort.InferenceSession(str(graph), providers=[("TensorrtExecutionProvider", options)])
    if session.get_providers()[0] != "TensorrtExecutionProvider" or not context.is_file():
        raise BuilderUnavailable(
            f"onnxruntime's TensorRT provider did not start or wrote no {context.name}"
        )
    entries = [e for e in tower.tensorrt_ep_context if e["file"] != context.name]
    entries.append(
        {
            "file": context.name,
            "precision": precision,
            "graph": graph.name,
            "graph_sha256": manifest.files.get(graph.name, {}).get("sha256"),
            "profiles": [p.to_dict() for p in engine_profiles],
            "onnxruntime": ort.__version__,
            "platform": current_platform(),
        }
    )
    tower.tensorrt_ep_context[:] = entries
    manifest.save(bundle_dir)
    report(
        f"[build-engine] {context.name}: EPContext graph for onnxruntime's TensorRT provider "
        f"({time.perf_counter() - started:.1f} s); load it with that provider"
    )
    return context
