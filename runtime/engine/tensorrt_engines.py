"""Native TensorRT engines as plain data: profiles, manifest entries, matching and planning.

Everything here is plain Python (no TensorRT, no CUDA), so the decisions the native backend
makes are tested on any machine:
- the optimisation profiles an engine is built with (vision by batch; text by batch and by
  sequence-length bucket, so a 20-token query does not run in an 8192-token shape);
- the profile a request runs in (the smallest length bucket that holds it) and how a batch
  above the profile's maximum is split;
- the device / pinned buffer sizes one execution context needs (the largest shape of any
  profile, allocated once);
- the manifest entry of a built engine (precision, profiles, TensorRT flavour and version, GPU,
  platform, source graph sha256) and whether it runs on this machine: every reason it does
  not is said, so the runtime rebuilds or refuses with a clear message instead of crashing
  in TensorRT's deserialiser.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle.manifest import TowerManifest
from ..errors import OptionError
from ..towers import tower_spec

Shape = list[int]
MANIFEST_KEY = "tensorrt_engines"  # per tower, beside "graphs" (TowerManifest.tensorrt_engines)
FLAVOURS = ("tensorrt", "tensorrt_rtx")
# Text buckets: short queries, the encode_text default, long passages, the model's maximum.
# The batch shrinks with the length so that no profile reserves more than 32 x 512 tokens
# of activations (attention workspace grows with batch x length^2).
DEFAULT_TEXT_PROFILES: tuple[tuple[int, int], ...] = ((32, 128), (32, 512))
DEFAULT_VISION_PROFILES: tuple[tuple[int, None], ...] = ((32, None),)
OPT_BATCH = 8
# TensorRT for RTX compiles for RTX-class GPUs only (its ComputeCapability enum): Turing to
# Blackwell RTX, not Hopper (9.0), data-centre Blackwell (10.0) or the Jetsons (8.7, 11.0).
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
NUMPY_DTYPES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "bool": 1}


# ----- profiles --------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineProfile:
    """One optimisation profile: (min, opt, max) shape per input. `max_length` is the
    sequence bucket (None for vision)."""

    max_batch: int
    max_length: int | None
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "max_length": self.max_length,
            "shapes": {name: [list(s) for s in triple] for name, triple in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineProfile:
        return cls(
            max_batch=int(data["max_batch"]),
            max_length=None if data.get("max_length") is None else int(data["max_length"]),
            shapes={
                name: (list(t[0]), list(t[1]), list(t[2])) for name, t in data["shapes"].items()
            },
        )


def _has_sequence(tower_name: str) -> bool:
    """Whether the tower's inputs have a sequence axis (profiles are then BATCHxLENGTH)."""
    return "sequence" in tower_spec(tower_name).dynamic_axes


def parse_profiles(spec: str | None, tower_name: str) -> list[tuple[int, int | None]]:
    """`--profiles`: "32x128,32x512,8x2048" (batch x length) for text, "1,32" for vision."""
    if spec is None or not spec.strip():
        return list(DEFAULT_TEXT_PROFILES if _has_sequence(tower_name) else DEFAULT_VISION_PROFILES)
    result: list[tuple[int, int | None]] = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise OptionError(f"bad profile {item!r}: use BATCHxLENGTH (text) or BATCH") from None
        sequence = _has_sequence(tower_name)
        if sequence and len(numbers) == 2 and min(numbers) >= 1:
            result.append((numbers[0], numbers[1]))
        elif not sequence and len(numbers) == 1 and numbers[0] >= 1:
            result.append((numbers[0], None))
        else:
            form = "BATCHxLENGTH, e.g. 32x512" if sequence else "BATCH, e.g. 32"
            raise OptionError(f"bad {tower_name} profile {item!r}: use {form}")
    return result


def tower_profiles(
    tower: TowerManifest, buckets: Iterable[tuple[int, int | None]], tower_name: str
) -> list[EngineProfile]:
    """Profiles for the tower's inputs: symbolic axes ("batch", "sequence") vary, fixed axes
    stay. Text buckets beyond the manifest's max_length are dropped (and that length added
    when a dropped bucket would have covered it); sorted by length, then batch."""
    buckets = list(buckets)
    if _has_sequence(tower_name):
        cap = tower.settings.max_length
        kept = [(b, length) for b, length in buckets if length is not None and length <= cap]
        over = [(b, length) for b, length in buckets if length is not None and length > cap]
        if over and all(length != cap for _, length in kept):
            kept.append((min(b for b, _ in over), cap))
        buckets = sorted(set(kept), key=lambda b: (b[1], b[0]))
    profiles = []
    for max_batch, max_length in buckets:
        ranges = {
            "batch": (1, min(OPT_BATCH, max_batch), max_batch),
            "sequence": (1, max_length or 1, max_length or 1),
        }
        shapes = {}
        for spec in tower.inputs:
            triple: list[Shape] = [[], [], []]
            for axis in spec.shape:
                for position in range(3):
                    triple[position].append(
                        ranges[axis][position] if isinstance(axis, str) else int(axis)
                    )
            shapes[spec.name] = (triple[0], triple[1], triple[2])
        profiles.append(EngineProfile(max_batch, max_length, shapes))
    if not profiles:
        raise OptionError(f"no {tower_name} profile left (max_length of the bundle is too small?)")
    return profiles


def choose_profile(profiles: Sequence[EngineProfile], length: int | None) -> int:
    """Index of the profile a request of `length` tokens runs in: the smallest bucket that
    holds it (vision: the profile with the largest batch)."""
    if length is None or all(p.max_length is None for p in profiles):
        return max(range(len(profiles)), key=lambda i: profiles[i].max_batch)
    fitting = [
        i for i, p in enumerate(profiles) if p.max_length is not None and p.max_length >= length
    ]
    if not fitting:
        longest = max(p.max_length or 0 for p in profiles)
        raise ValueError(
            f"{length} tokens exceed the engine's longest profile ({longest}); pass a smaller "
            f"max_length or build the engine with a longer bucket, e.g. clipedge build-engine "
            f"BUNDLE --tower text --profiles 32x128,32x512,2x{length}"
        )
    return min(fitting, key=lambda i: (profiles[i].max_length, -profiles[i].max_batch))


def split_batch(batch: int, max_batch: int) -> list[slice]:
    """Consecutive slices of at most `max_batch` items covering `batch` items."""
    if batch < 1 or max_batch < 1:
        raise ValueError(f"need batch >= 1 and max_batch >= 1, got {batch}, {max_batch}")
    return [slice(start, min(start + max_batch, batch)) for start in range(0, batch, max_batch)]


def buffer_plan(
    profiles: Sequence[EngineProfile],
    tensors: dict[str, tuple[str, list[int | str]]],
) -> dict[str, int]:
    """Bytes of each I/O tensor's device (and pinned host) buffer: its largest shape over
    all profiles. `tensors` maps name to (numpy dtype name, manifest shape with "batch" /
    "sequence" axes); inputs take their profile max shapes, outputs the axes' maxima."""
    plan: dict[str, int] = {}
    for name, (dtype, shape) in tensors.items():
        itemsize = NUMPY_DTYPES[dtype]
        largest = 0
        for profile in profiles:
            if name in profile.shapes:
                dims = profile.shapes[name][2]
            else:
                axes = {"batch": profile.max_batch, "sequence": profile.max_length or 1}
                dims = [axes[d] if isinstance(d, str) else int(d) for d in shape]
            largest = max(largest, math.prod(dims) * itemsize)
        plan[name] = largest
    return plan


# ----- the machine and the manifest entry ------------------------------------------------


def l4t_release(path: Path = Path("/etc/nv_tegra_release")) -> str | None:
    """The Jetson Linux (L4T) release, e.g. "36.4.0" from "# R36 (release), REVISION: 4.0"."""
    try:
        head = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    try:
        major = head.split("R", 1)[1].split(" ", 1)[0]
        revision = head.split("REVISION:", 1)[1].split(",", 1)[0].strip()
    except IndexError:
        return None
    return f"{major}.{revision}"


def current_platform() -> dict[str, str | None]:
    return {"machine": platform.machine(), "l4t": l4t_release()}


@dataclass(frozen=True)
class Machine:
    """What can run engines here: TensorRT flavours importable (name -> version), the GPU's
    name and compute capability ("8.9"; None without a usable GPU) and the platform."""

    flavours: dict[str, str]
    gpu_name: str | None
    compute_capability: str | None
    platform: dict[str, str | None] = field(default_factory=current_platform)


@dataclass(frozen=True)
class EngineEntry:
    """A built engine in the bundle (manifest `towers.<tower>.tensorrt_engines[]`)."""

    file: str
    precision: str
    graph: str
    graph_sha256: str
    profiles: list[EngineProfile]
    flavour: str
    tensorrt_version: str
    version_compatible: bool
    gpu_name: str | None
    compute_capabilities: list[str]
    platform: dict[str, str | None]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    builder_optimization_level: int | None = None
    bytes: int = 0
    build_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "precision": self.precision,
            "graph": self.graph,
            "graph_sha256": self.graph_sha256,
            "profiles": [p.to_dict() for p in self.profiles],
            "flavour": self.flavour,
            "tensorrt_version": self.tensorrt_version,
            "version_compatible": self.version_compatible,
            "gpu": {"name": self.gpu_name, "compute_capabilities": self.compute_capabilities},
            "platform": dict(self.platform),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "builder_optimization_level": self.builder_optimization_level,
            "bytes": self.bytes,
            "build_seconds": self.build_seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineEntry:
        gpu = data.get("gpu") or {}
        return cls(
            file=data["file"],
            precision=data["precision"],
            graph=data["graph"],
            graph_sha256=data["graph_sha256"],
            profiles=[EngineProfile.from_dict(p) for p in data["profiles"]],
            flavour=data["flavour"],
            tensorrt_version=data["tensorrt_version"],
            version_compatible=bool(data.get("version_compatible", False)),
            gpu_name=gpu.get("name"),
            compute_capabilities=list(gpu.get("compute_capabilities") or []),
            platform=dict(data.get("platform") or {}),
            inputs=list(data.get("inputs") or []),
            outputs=list(data.get("outputs") or []),
            builder_optimization_level=data.get("builder_optimization_level"),
            bytes=int(data.get("bytes", 0)),
            build_seconds=data.get("build_seconds"),
        )


def engine_entries(tower: TowerManifest) -> list[EngineEntry]:
    return [EngineEntry.from_dict(e) for e in tower.tensorrt_engines]


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def mismatches(entry: EngineEntry, machine: Machine, graph_sha256: str | None) -> list[str]:
    """Every reason `entry` cannot run here; empty when it can."""
    reasons = []
    if graph_sha256 is not None and entry.graph_sha256 != graph_sha256:
        reasons.append(f"built from another {entry.graph} (sha256 {entry.graph_sha256[:12]}…)")
    runtime_version = machine.flavours.get(entry.flavour)
    if runtime_version is None:
        installed = ", ".join(f"{k} {v}" for k, v in machine.flavours.items()) or "none"
        reasons.append(f"needs {entry.flavour} (installed: {installed})")
    elif entry.version_compatible:
        built, here = _version_tuple(entry.tensorrt_version), _version_tuple(runtime_version)
        if here[0] != built[0] or here < built:
            reasons.append(
                f"version-compatible engine of {entry.flavour} {entry.tensorrt_version} needs "
                f"the same major version, at least as new (here {runtime_version})"
            )
    elif _version_tuple(entry.tensorrt_version) != _version_tuple(runtime_version):
        reasons.append(
            f"built with {entry.flavour} {entry.tensorrt_version}, here {runtime_version} "
            "(rebuild, or build with --version-compatible)"
        )
    if machine.compute_capability is None:
        reasons.append("no usable NVIDIA GPU here")
    else:
        allowed = entry.compute_capabilities or (
            list(RTX_COMPUTE_CAPABILITIES) if entry.flavour == "tensorrt_rtx" else []
        )
        if machine.compute_capability not in allowed:
            reasons.append(
                f"built for compute capability {', '.join(allowed) or '?'}, this GPU "
                f"({machine.gpu_name}) is {machine.compute_capability}"
            )
        elif (
            entry.flavour == "tensorrt"
            and entry.gpu_name is not None
            and machine.gpu_name is not None
            and entry.gpu_name != machine.gpu_name
        ):
            reasons.append(f"tuned on {entry.gpu_name}, this GPU is {machine.gpu_name}")
    built_on, here_on = entry.platform, machine.platform
    if built_on.get("machine") and built_on.get("machine") != here_on.get("machine"):
        reasons.append(f"built on {built_on.get('machine')}, this is {here_on.get('machine')}")
    if built_on.get("l4t") != here_on.get("l4t") and (built_on.get("l4t") or here_on.get("l4t")):
        reasons.append(
            f"built for L4T {built_on.get('l4t') or '(not Jetson)'}, "
            f"this is L4T {here_on.get('l4t') or '(not Jetson)'}"
        )
    return reasons


@dataclass(frozen=True)
class EngineChoice:
    """The engine chosen for a tower and precision, or None with the reasons per file."""

    entry: EngineEntry | None
    rejected: dict[str, list[str]]

    def explain(self, tower_name: str, precision: str) -> str:
        if not self.rejected:
            return (
                f"the bundle has no TensorRT engine for the {tower_name} tower at {precision}; "
                f"build one: clipedge build-engine BUNDLE --tower {tower_name} "
                f"--precision {precision}"
            )
        lines = [f"no {tower_name} {precision} TensorRT engine of the bundle runs here:"]
        lines += [f"  {name}: {'; '.join(why)}" for name, why in self.rejected.items()]
        lines.append(
            f"rebuild it here: clipedge build-engine BUNDLE --tower {tower_name} "
            f"--precision {precision} (or load with TensorrtOptions(rebuild=True))"
        )
        return "\n".join(lines)


def choose_engine(
    tower: TowerManifest,
    precision: str,
    machine: Machine,
    files: dict[str, dict[str, Any]],
) -> EngineChoice:
    """The first engine of the tower at `precision` that runs on `machine`. `files` is the
    manifest's file table: the graph's current sha256 comes from it (no re-hashing)."""
    rejected: dict[str, list[str]] = {}
    for entry in engine_entries(tower):
        if entry.precision != precision:
            continue
        current = files.get(entry.graph, {}).get("sha256")
        reasons = mismatches(entry, machine, current)
        if not reasons:
            return EngineChoice(entry, rejected)
        rejected[entry.file] = reasons
    return EngineChoice(None, rejected)


def runnable_precisions(
    tower: TowerManifest, machine: Machine, files: dict[str, dict[str, Any]]
) -> list[str]:
    """Precisions of the tower with an engine that runs here."""
    found = []
    for entry in engine_entries(tower):
        if entry.precision not in found and not mismatches(
            entry, machine, files.get(entry.graph, {}).get("sha256")
        ):
            found.append(entry.precision)
    return found


def engine_file_name(tower_name: str, precision: str, flavour: str, target: str) -> str:
    """`text.int8.trt10.13-sm87.engine`-style names: one file per tower, precision, flavour
    and target GPU, so engines for several GPUs can sit in one bundle."""
    tag = "rtx" if flavour == "tensorrt_rtx" else "trt"
    safe = "".join(c if c.isalnum() or c in ".-" else "-" for c in target.lower())
    return f"{tower_name}.{precision}.{tag}-{safe}.engine"
