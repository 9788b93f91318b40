"""Every path a manifest names stays inside its bundle.

A manifest names files: graphs, the tokenizer and preprocessor, the `files` table, engines.
Each must be relative, normalised (no `.`, `..`, empty or backslash parts) and, after
following symlinks, inside the bundle directory, so a manifest cannot make clipedge read (or
hash, or hand to a backend) a file elsewhere on the machine. Anything else is a
`BundleError` naming the manifest entry.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BundleError


def _bad_form(name: Any) -> str | None:
    """Why `name` is not a relative, normalised POSIX path (None when it is one)."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if "\\" in name or "\0" in name or ":" in name:
        return "contains a backslash, a colon or a NUL"
    if name.startswith("/"):
        return "is absolute"
    if posixpath.normpath(name) != name or name == ".":
        return "is not normalised"
    if ".." in name.split("/"):
        return "leaves the bundle (..)"
    return None


def _has_link(bundle_dir: Path, name: str) -> bool:
    """Whether any part of `name` below the bundle is a symlink (one lstat per part)."""
    path = Path(bundle_dir)
    for part in name.split("/"):
        path = path / part
        if path.is_symlink():
            return True
    return False


def bundle_file(bundle_dir: Path, name: Any, entry: str) -> Path:
    """`bundle_dir / name`, refused (a `BundleError` naming `entry`) unless `name` is a
    relative, normalised path that stays inside the bundle once symlinks are followed."""
    problem = _bad_form(name)
    if problem is not None:
        raise BundleError(
            f"{bundle_dir}: manifest entry {entry} = {name!r} {problem}: every path in a "
            "bundle must be relative and inside it"
        )
    path = Path(bundle_dir) / name
    if not _has_link(bundle_dir, name):  # normalised, no `..`, no link: inside
        return path
    root = Path(bundle_dir).resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        raise BundleError(
            f"{bundle_dir}: manifest entry {entry} = {name!r} is a symlink to {target}, "
            "outside the bundle"
        )
    return path


def manifest_paths(manifest: Any) -> Iterator[tuple[str, Any]]:
    """(entry, path) for every path the manifest names."""
    for name in manifest.files:
        yield f"files[{name!r}]", name
    for tower_name, tower in manifest.towers.items():
        where = f"towers.{tower_name}"
        for precision, graph in tower.graphs.items():
            yield f"{where}.graphs.{precision}.file", graph.file
            if graph.onnxruntime_cpu_file is not None:
                yield f"{where}.graphs.{precision}.onnxruntime_cpu_file", graph.onnxruntime_cpu_file
        for key in ("tokenizer", "preprocessor"):
            if hasattr(tower.settings, key):
                yield f"{where}.settings.{key}", getattr(tower.settings, key)
        for kind in ("tensorrt_engines", "tensorrt_ep_context"):
            for index, entry in enumerate(getattr(tower, kind)):
                file = entry.get("file") if isinstance(entry, dict) else None
                yield f"{where}.{kind}[{index}].file", file


def check_paths(bundle_dir: Path, manifest: Any) -> None:
    """Refuse a manifest that names any path outside its bundle (see `bundle_file`)."""
    for entry, name in manifest_paths(manifest):
        bundle_file(bundle_dir, name, entry)
