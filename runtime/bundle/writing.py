"""Writing a bundle folder without ever deleting what is not a bundle.

A new bundle is written into a staging folder beside its target and swapped in at the end:
the old bundle is renamed aside, the new one renamed in, then the old one deleted; a failure
at any step leaves the old bundle in place. `overwrite` replaces only an empty folder or a
clipedge bundle (a readable `clipedge.json`) holding nothing but its own files; anything else
is refused, naming what was found, before any work starts. Folders are made with `os.mkdir`,
so a bundle's folders and files follow the umask (0755 / 0644 typically).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import OptionError
from .manifest import FORMAT_NAME, MANIFEST_NAME, Manifest
from .paths import manifest_paths

# What clipedge itself leaves in a bundle besides the files its manifest lists: the
# calibration report, a half-written manifest, staging leftovers, TensorRT graph copies
# (`build-engine --keep-graph`) and onnxruntime's TensorRT cache.
BY_PRODUCTS = (
    "accuracy_report.json",
    "*.partial",
    ".clipedge-*",
    "*.trt.onnx",
    "*.trt.onnx.data",
    ".*.trt-*.onnx",
    ".trt-cache",
)


class TargetError(OptionError):
    """The output folder cannot be (over)written: it holds something that is not a bundle."""


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _bundle_names(target: Path) -> set[str] | None:
    """Top-level names the bundle in `target` owns, or None when `target` holds no readable
    clipedge manifest."""
    try:
        data = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return None
    names = {MANIFEST_NAME}
    with contextlib.suppress(Exception):  # an old or odd manifest: its `files` at least
        manifest = Manifest.from_dict(data)
        names |= {str(path).split("/")[0] for _, path in manifest_paths(manifest) if path}
    files = data.get("files")
    if isinstance(files, dict):
        names |= {str(name).split("/")[0] for name in files}
    return names


def check_target(target: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse, before any work, an output folder the bundle cannot go to; see the module."""
    target = Path(target)
    option = "--overwrite (overwrite=True)"
    if target.is_symlink():
        raise TargetError(f"{target} is a symlink: name the folder itself")
    if target.exists() and not target.is_dir():
        raise TargetError(f"{target} exists and is not a folder")
    here = Path.cwd().resolve()
    resolved = target.resolve()
    if resolved == here or resolved in here.parents:
        raise TargetError(
            f"{target} is or contains the current directory; a bundle replaces its folder "
            "whole: name a folder of its own (e.g. -o ./bundle)"
        )
    if not target.is_dir():
        return target
    found = sorted(entry.name for entry in target.iterdir())
    if not found:
        return target
    if not overwrite:
        raise TargetError(f"{target} is not empty; pass {option} to replace the bundle in it")
    owned = _bundle_names(target)
    if owned is None:
        raise TargetError(
            f"{target} is not a clipedge bundle (no readable {MANIFEST_NAME}) and not empty: "
            f"it holds {_listing(found)}; refusing to delete it"
        )
    foreign = [
        name
        for name in found
        if name not in owned and not any(fnmatch.fnmatch(name, p) for p in BY_PRODUCTS)
    ]
    if foreign:
        raise TargetError(
            f"{target} is a clipedge bundle but also holds {_listing(foreign)}, which its "
            "manifest does not list; move them out, or choose another folder"
        )
    return target


def _unique(parent: Path, name: str, kind: str) -> Path:
    return parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def swap_in(staging: Path, target: Path) -> None:
    """Rename the finished bundle to `target`: an old one is renamed aside first and deleted
    only after, so `target` never holds a half-deleted bundle, even when interrupted."""
    aside = _unique(target.parent, target.name, "old")
    if target.exists():
        os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        if aside.exists():
            os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_bundle(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A fresh staging folder beside `target` (checked first, see `check_target`) that
    becomes `target` when the block ends without an error; removed otherwise."""
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _unique(target.parent, target.name, "staging")
    os.mkdir(staging)  # mode 0o777 less the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield staging
        check_target(target, overwrite)  # it may have changed during a long export
        swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
