"""The bundle manifest (`clipedge.json`): what the exporter writes and the runtime reads.

A bundle is a directory holding one ONNX graph per tower and precision, the tokenizer files,
the preprocessor config and this manifest. The runtime needs nothing beyond the bundle, so the
manifest carries every number the pre- and post-processing use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .paths import check_paths

MANIFEST_NAME = "clipedge.json"
FORMAT_NAME = "clipedge-bundle"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one graph input or output (symbolic axes are strings)."""

    name: str
    dtype: str
    shape: list[int | str]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=list(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Accuracy:
    """What calibration measured for a lower-precision graph against fp32 on held-out inputs."""

    cosine_min: float
    cosine_mean: float
    target: float
    passed: bool
    method: str | None = None
    fp32_blocks: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Accuracy:
        return cls(
            cosine_min=float(data["cosine_min"]),
            cosine_mean=float(data["cosine_mean"]),
            target=float(data["target"]),
            passed=bool(data["passed"]),
            method=data.get("method"),
            fp32_blocks=list(data.get("fp32_blocks", [])),
            overflow=list(data.get("overflow", [])),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GraphEntry:
    """One graph file of a tower at one precision.

    `device` says where the graph is meant to run fast: "any" (fp32), "gpu" (fp16 and Q/DQ
    int8 for TensorRT / CUDA), "cpu" (onnxruntime CPU int8) or "openvino" (an OpenVINO IR
    `.xml`; its `.bin` beside it). `accuracy`: None for the fp32 reference.
    `onnxruntime_cpu_file`: the same graph with its attention fused into onnxruntime's
    MultiHeadAttention (memory linear in the text length), which only onnxruntime reads; the
    CPU backend loads it, every other backend `file`. None: `file` serves all.
    `weight_bits`: the range of an int8 graph's weights, 7 (exact on every CPU) or 8 (exact
    only where int8 products add in int32: `engine.cpu_features`); None for float graphs
    and int8 graphs from before it was recorded (7).
    """

    file: str
    precision: str
    device: str = "any"
    accuracy: Accuracy | None = None
    onnxruntime_cpu_file: str | None = None
    weight_bits: int | None = None

    def file_for(self, backend: str) -> str:
        """The file a backend loads ("cpu" is onnxruntime's CPU provider)."""
        return (
            self.onnxruntime_cpu_file
            if backend == "cpu" and self.onnxruntime_cpu_file
            else self.file
        )

    @property
    def passed(self) -> bool:
        return self.accuracy is None or self.accuracy.passed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphEntry:
        accuracy = data.get("accuracy")
        if data.get("weight_bits") not in (None, 7, 8):
            raise ValueError(f"weight_bits must be 7 or 8, got {data['weight_bits']!r}")
        return cls(
            file=data["file"],
            precision=data["precision"],
            device=data.get("device", "any"),
            accuracy=None if accuracy is None else Accuracy.from_dict(accuracy),
            onnxruntime_cpu_file=data.get("onnxruntime_cpu_file"),
            weight_bits=data.get("weight_bits"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "precision": self.precision,
            "device": self.device,
            "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
            **(
                {"onnxruntime_cpu_file": self.onnxruntime_cpu_file}
                if self.onnxruntime_cpu_file
                else {}
            ),
            **({"weight_bits": self.weight_bits} if self.weight_bits is not None else {}),
        }


@dataclass(frozen=True)
class TextSettings:
    """The text tower's pre-processing: tokenizer file, pad id, and the token lengths: the
    default every consumer uses (`default_max_length`) and the most any may ask for."""

    tokenizer: str
    pad_token_id: int
    default_max_length: int
    max_length: int


@dataclass(frozen=True)
class VisionSettings:
    """The vision tower's pre-processing: its config file and the square input size, and the
    tokens an image is inside the tower (patches + the class token), what it counts against
    a token budget (None in bundles exported before it was recorded: images count by number
    only)."""

    image_size: int
    preprocessor: str
    tokens: int | None = None


SETTINGS = {"text": TextSettings, "vision": VisionSettings}


@dataclass(frozen=True)
class TowerManifest:
    """Everything the runtime needs to run one tower.

    `outputs[0]` is `text_embeds` / `image_embeds` [batch, dim] when the graph pools inside,
    `last_hidden_state` [batch, tokens, dim] when the runtime pools (`pooling`).
    `tensorrt_engines` / `tensorrt_ep_context`: what `clipedge build-engine` added.
    """

    graphs: dict[str, GraphEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    pooling: str
    settings: TextSettings | VisionSettings
    tensorrt_engines: list[dict[str, Any]] = field(default_factory=list)
    tensorrt_ep_context: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> TowerManifest:
        settings = SETTINGS[name]
        return cls(
            graphs={k: GraphEntry.from_dict(v) for k, v in data["graphs"].items()},
            inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
            pooling=data["pooling"],
            settings=settings(
                **{
                    f.name: data["settings"][f.name]
                    for f in fields(settings)
                    if f.name in data["settings"]
                }
            ),
            tensorrt_engines=list(data.get("tensorrt_engines", [])),
            tensorrt_ep_context=list(data.get("tensorrt_ep_context", [])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": {k: v.to_dict() for k, v in self.graphs.items()},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "pooling": self.pooling,
            "settings": asdict(self.settings),
            "tensorrt_engines": self.tensorrt_engines,
            "tensorrt_ep_context": self.tensorrt_ep_context,
        }

    @property
    def output_dim(self) -> int | str:
        """The embedding width the graph declares (its output's last axis)."""
        return self.outputs[0].shape[-1]


@dataclass(frozen=True)
class Manifest:
    """The parsed `clipedge.json` of a bundle.

    `files` maps every file of the bundle to its size in bytes and sha256, so a missing or
    truncated file is found when the bundle is opened. `source` (where the checkpoint came
    from) and `versions` (of the exporting tools) are provenance, shown by `clipedge verify`.
    """

    embed_dim: int
    matryoshka_dimensions: list[int]
    normalize: bool
    task_instructions: dict[str, str]
    towers: dict[str, TowerManifest]
    source: dict[str, Any]
    versions: dict[str, str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            embed_dim=int(data["embed_dim"]),
            matryoshka_dimensions=[int(d) for d in data["matryoshka_dimensions"]],
            normalize=bool(data["normalize"]),
            task_instructions=dict(data["task_instructions"]),
            towers={k: TowerManifest.from_dict(k, v) for k, v in data["towers"].items()},
            source=dict(data.get("source", {})),
            versions=dict(data.get("versions", {})),
            files={name: dict(info) for name, info in data["files"].items()},
            format_version=FORMAT_VERSION,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "embed_dim": self.embed_dim,
            "matryoshka_dimensions": self.matryoshka_dimensions,
            "normalize": self.normalize,
            "task_instructions": self.task_instructions,
            "towers": {k: v.to_dict() for k, v in self.towers.items()},
            "source": self.source,
            "versions": self.versions,
            "files": self.files,
        }

    def save(self, bundle_dir: str | Path) -> Path:
        """Write the manifest atomically (a reader never sees half of it)."""
        path = Path(bundle_dir) / MANIFEST_NAME
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        os.replace(partial, path)
        return path


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format 2's shape: tower settings were loose keys beside
    `graphs`, an accuracy's target was `target_cosine`, and `output` / `external_data`
    (derivable) were stored."""
    towers = {}
    for name, tower in data["towers"].items():
        keys = [f.name for f in fields(SETTINGS[name])] if name in SETTINGS else []
        graphs = {}
        for precision, graph in tower["graphs"].items():
            graph = {k: v for k, v in graph.items() if k != "external_data"}
            if graph.get("accuracy") is not None:
                accuracy = dict(graph["accuracy"])
                accuracy["target"] = accuracy.pop("target_cosine", accuracy.get("target"))
                graph["accuracy"] = accuracy
            graphs[precision] = graph
        towers[name] = {
            **{k: v for k, v in tower.items() if k not in keys and k != "output"},
            "graphs": graphs,
            "settings": {k: tower[k] for k in keys if k in tower},
        }
    return {**data, "towers": towers, "format_version": 2}


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate a bundle's manifest; every failure is a BundleError that says why."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {bundle_dir} is not a clipedge bundle")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise BundleError(f"{path} is not a clipedge manifest (no 'format': '{FORMAT_NAME}')")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path} has no integer 'format_version'")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path} was written by a newer clipedge (bundle format {version}, this clipedge "
            f"reads up to {FORMAT_VERSION}); upgrade clipedge"
        )
    unknown = [name for name in data.get("towers", {}) if name not in SETTINGS]
    if unknown:
        raise BundleError(
            f"{path} has an unknown tower {unknown[0]!r} (known: {', '.join(SETTINGS)})"
        )
    try:
        manifest = Manifest.from_dict(upgrade_v1(data) if version == 1 else data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(
            f"{path} (bundle format {version}) is incomplete or malformed: {exc!r}"
        ) from exc
    for name, tower in manifest.towers.items():
        if isinstance(tower.output_dim, int) and tower.output_dim != manifest.embed_dim:
            raise BundleError(
                f"{path}: the {name} graph's output is {tower.output_dim} wide, the manifest's "
                f"embed_dim is {manifest.embed_dim}"
            )
        size = getattr(tower.settings, "image_size", None)
        sides = [axis for spec in tower.inputs for axis in spec.shape[-2:]]
        if size is not None and any(isinstance(s, int) and s != size for s in sides):
            raise BundleError(
                f"{path}: towers.{name}.settings.image_size is {size}, the graph inputs are "
                f"{[spec.shape for spec in tower.inputs]}"
            )
    check_paths(bundle_dir, manifest)
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (graphs can be several GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(
    bundle_dir: Path, names: Iterable[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the named files, or of every file in the bundle (the manifest
    itself excluded): a new bundle's folder holds only what its writer put there, while a
    calibrated one names what it wrote, so no stray file gets signed."""
    bundle_dir = Path(bundle_dir)
    paths = (
        [bundle_dir / name for name in names]
        if names is not None
        else [p for p in bundle_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME]
    )
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(paths)
    }
