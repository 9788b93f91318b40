"""The execution plan: which backend runs the bundle and which precision each tower loads.

An export with calibration adds lower-precision graphs next to fp32, each with the device it
is meant for and whether it met its accuracy target. Preference is fastest first per device
class: on GPUs TensorRT/CUDA run Q/DQ int8 fastest, then fp16; on CPUs the onnxruntime int8
graph beats fp32, and under OpenVINO its own NNCF int8 IR beats everything (figures in the
README). Backend and precision are chosen here, once, from the bundle, the machine and the
caller's wishes; the model only follows the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..bundle.manifest import GraphEntry, Manifest
from ..errors import BackendError, BundleError, OptionError
from ..user_warnings import warn
from . import cpu_features
from .registry import backend as get_backend

log = logging.getLogger(__name__)

# OpenVINO runs its int8 IR, or reads the fp32 ONNX graph and runs it in bf16 (or f32).
PREFERENCE = {
    "gpu": ("int8", "fp16", "fp32"),
    "cpu": ("int8-cpu", "fp32"),
    "openvino": ("int8-ov", "fp32"),
}
# `auto` takes the first available GPU backend; else OpenVINO for bundles built for it.
AUTO_GPU_ORDER = ("tensorrt", "cuda")
# `auto` and "tensorrt" run the bundle's native engines when every tower has one for this
# machine (clipedge build-engine), else onnxruntime's TensorRT provider; options for another
# backend (`TensorrtEpOptions` with "tensorrt") say the caller wants that backend instead.
NATIVE = "tensorrt-native"


@dataclass(frozen=True)
class TowerPlan:
    """One tower: the precision to load and its graph file."""

    tower: str
    precision: str
    graph: Path


@dataclass(frozen=True)
class ExecutionPlan:
    """The backend for the whole bundle and, per tower, what it loads. `auto` is True when
    the backend was chosen automatically (a provider failing to start then only logs)."""

    backend: str
    towers: dict[str, TowerPlan]
    auto: bool

    @property
    def device(self) -> str:
        return get_backend(self.backend).device

    @property
    def precisions(self) -> dict[str, str]:
        return {name: plan.precision for name, plan in self.towers.items()}


def choose_precision(
    tower: str, graphs: dict[str, GraphEntry], device: str, requested: str | None = None
) -> str:
    """The precision to load for `tower` on `device` ("cpu", "gpu" or "openvino")."""
    if requested is not None:
        if requested not in graphs:
            raise BundleError(
                f"bundle has no {requested} {tower} graph (available: {', '.join(graphs)})"
            )
        entry = graphs[requested]
        if entry.device == "openvino" and device != "openvino":  # OpenVINO IR, not ONNX
            raise BundleError(
                f"the {tower} {requested} graph ({entry.file}) runs only with backend='openvino'"
            )
        if not runs_exactly(entry, device):
            raise BundleError(
                f"the {tower} {requested} graph has 8-bit int8 weights, and this CPU (x86 "
                "without VNNI or AMX) adds int8 products in a saturating int16: its results "
                "would be wrong. Calibrate that precision with --weight-bits 7 (exact on "
                "every CPU), or load another precision"
            )
        if not entry.passed:
            warn(
                f"{tower} {requested} graph missed its accuracy target at export "
                f"({entry.accuracy}); results may drift from fp32",
                RuntimeWarning,
            )
        if entry.device not in ("any", device):
            warn(
                f"{tower} {requested} graph is meant for {entry.device}, running on {device}",
                RuntimeWarning,
            )
        return requested
    for precision in PREFERENCE[device]:
        entry = graphs.get(precision)
        if entry is None or not entry.passed or entry.device not in ("any", device):
            continue
        if runs_exactly(entry, device):
            return precision
        log.warning(
            "not loading the %s %s graph: its 8-bit int8 weights are not exact on this CPU "
            "(x86 without VNNI or AMX); calibrate with --weight-bits 7 to use it here",
            tower,
            precision,
        )
    raise BundleError(f"bundle has no {tower} graph usable on {device} (has: {', '.join(graphs)})")


def runs_exactly(entry: GraphEntry, device: str) -> bool:
    """False for a graph with 8-bit int8 weights on a CPU that adds int8 products in a
    saturating int16 (`cpu_features`); GPUs and other CPUs compute them exactly."""
    return entry.weight_bits != 8 or device == "gpu" or cpu_features.int8_products_exact()


def prefers_openvino(towers_graphs: list[dict[str, GraphEntry]]) -> bool:
    """True when every tower has a passing OpenVINO int8 graph: then, on a machine without an
    NVIDIA GPU, OpenVINO is the fastest backend for this bundle (if it is installed)."""
    return bool(towers_graphs) and all(
        "int8-ov" in graphs
        and graphs["int8-ov"].passed
        and runs_exactly(graphs["int8-ov"], "openvino")
        for graphs in towers_graphs
    )


# Every graph precision a bundle may hold.
PRECISIONS = ("fp32", "fp16", "int8", "int8-cpu", "int8-ov")


def check_request(backend: object, precision: object) -> None:
    """`backend` and `precision` are names this clipedge knows (an `OptionError` listing them
    otherwise); whether the bundle has the precision is the plan's question."""
    if not isinstance(backend, str):
        raise OptionError(f"backend must be a name, got {backend!r}")
    if backend != "auto":
        get_backend(backend)  # an unknown name lists the known ones
    if precision is not None and precision not in PRECISIONS:
        raise OptionError(
            f"precision must be one of {', '.join(PRECISIONS)} or None (the fastest that "
            f"passed), got {precision!r}"
        )


def choose_backend(requested: str, manifest: Manifest, options: object = None) -> str:
    """The backend that will run: the one asked for (or its fallback, with a warning, when it
    is not available here), or for `auto` the fastest available for this bundle. `options`,
    the caller's backend options, rule out native engines when they are another backend's.
    A backend asked for by name that is not installed and has no fallback is a
    `BackendError` with its install hint, here at load rather than at the first encode."""
    native_options = options is None or isinstance(options, get_backend(NATIVE).options_type)
    if requested in ("auto", "tensorrt") and native_options and _native_runs(manifest):
        log.info("backend %s: using the bundle's native TensorRT engines", requested)
        return NATIVE
    if requested == "auto":
        for name in AUTO_GPU_ORDER:
            if get_backend(name).available():
                log.info("backend auto: using %s", name)
                return name
        graphs = [tower.graphs for tower in manifest.towers.values()]
        if prefers_openvino(graphs) and get_backend("openvino").available():
            log.info("backend auto: using openvino (the bundle has OpenVINO int8 graphs)")
            return "openvino"
        return "cpu"
    chosen = get_backend(requested)
    while not chosen.available() and chosen.fallback is not None:
        fallback = get_backend(chosen.fallback)
        warn(
            f"backend {requested!r}: {chosen.name} is not available here (for GPUs install "
            f"onnxruntime-gpu); falling back to {fallback.name}",
            RuntimeWarning,
        )
        chosen = fallback
    if not chosen.available():
        hint = f": {chosen.install_hint}" if chosen.install_hint else ""
        raise BackendError(f"backend {chosen.name!r} is not installed here{hint}")
    return chosen.name


def _native_runs(manifest: Manifest) -> bool:
    from .tensorrt_backend import bundle_engines_run_here

    return bundle_engines_run_here(manifest)


def plan_execution(
    manifest: Manifest,
    bundle_dir: Path,
    backend: str = "auto",
    precision: str | None = None,
    options: object = None,
) -> ExecutionPlan:
    """Backend and, per tower, precision and graph file for this bundle on this machine."""
    check_request(backend, precision)
    name = choose_backend(backend, manifest, options)
    device = get_backend(name).device
    towers = {}
    for tower_name, tower in manifest.towers.items():
        graphs = tower.graphs
        if name == NATIVE and precision is None:  # only precisions with an engine here
            from .tensorrt_backend import runnable

            with_engines = runnable(manifest)[tower_name]
            graphs = {p: g for p, g in graphs.items() if p in with_engines} or graphs
        chosen = choose_precision(tower_name, graphs, device, precision)
        towers[tower_name] = TowerPlan(
            tower_name, chosen, Path(bundle_dir) / tower.graphs[chosen].file_for(name)
        )
    return ExecutionPlan(name, towers, auto=backend == "auto")
