"""The bundle manifest (`clipedge.json`): what the exporter writes and the runtime reads.

A bundle is a directory holding one ONNX graph per tower and precision, the tokenizer files,
the preprocessor config and this manifest. The runtime needs nothing beyond the bundle, so the
manifest carries every number the pre- and post-processing use.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..towers import TOWERS

MANIFEST_NAME = "clipedge.json"
FORMAT_NAME = "clipedge-bundle"
FORMAT_VERSION = 1


class BundleError(RuntimeError):
    """A bundle directory is missing, incomplete, corrupt or written by a newer clipedge."""


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
class GraphEntry:
    """One graph file of a tower at one precision.

    `device` says where the graph is meant to run fast: "any" (fp32), "gpu" (fp16 and Q/DQ
    int8 for TensorRT / CUDA), "cpu" (onnxruntime CPU int8) or "openvino" (an OpenVINO IR
    `.xml`, its weights in `external_data` `.bin`). `accuracy` summarises the calibration
    report (cosine to fp32, target, passed); None for the fp32 reference.
    """

    file: str
    precision: str
    external_data: str | None = None
    device: str = "any"
    accuracy: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.accuracy is None or bool(self.accuracy.get("passed"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphEntry:
        return cls(
            file=data["file"],
            precision=data["precision"],
            external_data=data.get("external_data"),
            device=data.get("device", "any"),
            accuracy=data.get("accuracy"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "precision": self.precision,
            "external_data": self.external_data,
            "device": self.device,
            "accuracy": self.accuracy,
        }


@dataclass(frozen=True)
class TowerManifest:
    """Everything the runtime needs to run one tower.

    `output` is "pooled" when the graph pools inside (`text_embeds` / `image_embeds`) and
    "token_states" when it returns `last_hidden_state` and the runtime pools.
    """

    graphs: dict[str, GraphEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    output: str
    pooling: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TowerManifest:
        known = {"graphs", "inputs", "outputs", "output", "pooling"}
        return cls(
            graphs={k: GraphEntry.from_dict(v) for k, v in data["graphs"].items()},
            inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
            output=data["output"],
            pooling=data["pooling"],
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": {k: v.to_dict() for k, v in self.graphs.items()},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "output": self.output,
            "pooling": self.pooling,
            **self.extra,
        }


@dataclass(frozen=True)
class Manifest:
    """The parsed `clipedge.json` of a bundle.

    Text extra keys: tokenizer (file name), pad_token_id, default_max_length, max_length.
    Vision extra keys: image_size, preprocessor (file name).
    `files` maps every file of the bundle to its size in bytes and sha256, so a missing or
    truncated file is found when the bundle is opened.
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
            towers={k: TowerManifest.from_dict(v) for k, v in data["towers"].items()},
            source=dict(data.get("source", {})),
            versions=dict(data.get("versions", {})),
            files={name: dict(info) for name, info in data["files"].items()},
            format_version=int(data["format_version"]),
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
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path} is incomplete or malformed: {exc!r}") from exc
    for name, tower in manifest.towers.items():
        if name not in TOWERS:
            raise BundleError(f"{path} has an unknown tower {name!r} (known: {', '.join(TOWERS)})")
        missing = [key for key in TOWERS[name].manifest_keys if key not in tower.extra]
        if missing:
            raise BundleError(f"{path}: the {name} tower lacks {', '.join(missing)}")
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (graphs can be several GB)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(bundle_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in the bundle (the manifest itself excluded)."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(Path(bundle_dir).iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }
