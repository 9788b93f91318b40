"""Where a checkpoint comes from: a local Hugging Face-layout directory or a hub id."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from clipedge.bundle.manifest import sha256_file
from clipedge.errors import ClipEdgeError

from .config import ClipConfig, parse_config
from .weights import TensorStore

WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, "tokenizer.json", "preprocessor_config.json")
OPTIONAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class CheckpointSourceError(ClipEdgeError, RuntimeError):
    """The checkpoint could not be found, downloaded or read."""


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint directory and where it came from (for the bundle manifest)."""

    directory: Path
    origin: dict[str, Any]
    raw_config: dict[str, Any]
    config: ClipConfig

    def open_tensors(self) -> TensorStore:
        """Lazy tensor access: the whole checkpoint is never held twice in memory."""
        handle = safe_open(str(self.directory / WEIGHTS_FILE), framework="pt")
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        return TensorStore(shapes, handle.get_tensor)


def resolve_source(source: str, revision: str | None = None) -> CheckpointSource:
    """Accept a local directory, or a hub id (`jinaai/jina-clip-v2`) fetched from the hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointSourceError(f"{path} is not a directory in the Hugging Face layout")
        # The folder's name, not the exporting machine's path; the hashes identify it.
        origin = {"kind": "local", "name": path.resolve().name}
        directory = path
    else:
        directory, origin = _download(source, revision)
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointSourceError(f"{directory} lacks {', '.join(missing)}")
    raw = json.loads((directory / "config.json").read_text())
    # What was exported, by content: the architecture and the weights.
    origin["config_sha256"] = sha256_file(directory / "config.json")
    origin["weights_sha256"] = sha256_file(directory / WEIGHTS_FILE)
    return CheckpointSource(directory, origin, raw, parse_config(raw))


def _download(repo_id: str, revision: str | None) -> tuple[Path, dict[str, Any]]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if repo_id.count("/") != 1:
        raise CheckpointSourceError(
            f"{repo_id!r} is neither an existing directory nor a hub id (owner/name)"
        )
    try:
        directory = snapshot_download(
            repo_id, revision=revision, allow_patterns=[*REQUIRED_FILES, *OPTIONAL_FILES]
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointSourceError(
            f"could not download {repo_id!r} from the Hugging Face hub ({exc.__class__.__name__}: "
            f"{exc}). Without network access, download the checkpoint elsewhere and pass its "
            "local directory instead"
        ) from exc
    directory = Path(directory)
    # The snapshot folder name is the commit hash that was resolved.
    origin = {"kind": "hub", "id": repo_id, "revision": revision, "commit": directory.name}
    return directory, origin
