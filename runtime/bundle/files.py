"""The bundle's files against the manifest: present, complete and unaltered.

Sizes are checked at every load (free). Hashes follow `verify_checksums`:

- `None` (default): every file's sha256 is checked on the first load of the bundle on this
  machine, and a stamp is written to the user's cache (`cache_root()/verified/`): per file
  its size, mtime_ns, ctime_ns, inode and device, with the sha256 it matched, and the hash
  of the manifest. A later load hashes only the files whose stat no longer matches the stamp
  (none, usually: cached start-up reads no file contents).
- `True`: every file is hashed at every load (and the stamp refreshed).
- `False`: no hashing (sizes only).

What a stamp can catch: any write through the file system, since it moves ctime, and ctime
cannot be set back (`touch -d` / `os.utime` restore mtime but set ctime to now); a file
replaced by another (new inode); a copy or move of the bundle (new path: no stamp yet). What
it cannot: bytes changed below the file system (a failing disk, a raw block device write, a
restored snapshot that keeps inodes and times), a file system that keeps no real ctime, a
clock set back to the stamp's time, or anyone able to rewrite the stamp itself (it guards
against accidents, not an attacker with the user's rights). `verify_checksums=True` or
`clipedge verify BUNDLE --files` re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_NAME, BundleError, Manifest, sha256_file
from .paths import bundle_file

log = logging.getLogger(__name__)

STAMP_VERSION = 1
# A file changed less than this long ago is hashed but not stamped: a second write within
# the same timestamp granule (a clock tick; 2 s on FAT) would leave its stat unchanged.
RACY_SECONDS = 2.0
# Files hashed at once on a first load (each thread reads 16 MiB at a time).
HASH_THREADS = 4


def cache_root() -> Path:
    """The user's clipedge cache: `$CLIPEDGE_CACHE_DIR`, else `$XDG_CACHE_HOME/clipedge`
    (default `~/.cache/clipedge`)."""
    if os.environ.get("CLIPEDGE_CACHE_DIR"):
        return Path(os.environ["CLIPEDGE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "clipedge")


def stamp_path(bundle_dir: Path) -> Path:
    """Where the stamp of the bundle at this (resolved) path lives."""
    key = hashlib.sha256(os.fsencode(Path(bundle_dir).resolve())).hexdigest()[:32]
    return cache_root() / "verified" / f"{key}.json"


def _state(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _read_stamp(path: Path, bundle_dir: Path) -> dict[str, Any]:
    """The stamp's per-file records, {} when there is none or it is unreadable or foreign."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(data, dict)
        or data.get("version") != STAMP_VERSION
        or data.get("bundle") != str(Path(bundle_dir).resolve())
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    return data["files"]


def _write_stamp(path: Path, bundle_dir: Path, manifest_sha256: str, files: dict) -> None:
    data = {
        "version": STAMP_VERSION,
        "bundle": str(Path(bundle_dir).resolve()),
        "manifest_sha256": manifest_sha256,
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(partial, path)
    except OSError as exc:  # a read-only cache costs a re-hash next time, nothing more
        log.debug("cannot write the verification stamp %s: %s", path, exc)


def check_files(
    bundle_dir: Path, manifest: Manifest, verify_checksums: bool | None = None
) -> list[str]:
    """Fail on a missing, truncated or altered file (a `BundleError` naming it); see the
    module's doc for `verify_checksums`. Returns the names of the files it hashed."""
    bundle_dir = Path(bundle_dir)
    states = {}
    for name, info in manifest.files.items():
        path = bundle_file(bundle_dir, name, f"files[{name!r}]")
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not path.is_file():
            raise BundleError(f"bundle file {path} is missing")
        if stat.st_size != info["bytes"]:
            raise BundleError(
                f"bundle file {path} has {stat.st_size} bytes, the manifest says "
                f"{info['bytes']}: it is truncated or corrupt"
            )
        states[name] = _state(stat)
    if verify_checksums is False:
        return []
    stamp = stamp_path(bundle_dir)
    known = _read_stamp(stamp, bundle_dir) if verify_checksums is None else {}
    records = {}
    for name, info in manifest.files.items():
        record = {"sha256": info["sha256"], "stat": states[name]}
        if known.get(name) == record:
            records[name] = record
    hashed = [name for name in manifest.files if name not in records]
    # hashlib releases the GIL: files hash in parallel, towards the disk's read speed.
    workers = max(1, min(len(hashed), os.cpu_count() or 1, HASH_THREADS))
    with ThreadPoolExecutor(workers, "clipedge-sha256") as pool:
        digests = list(pool.map(lambda name: sha256_file(bundle_dir / name), hashed))
    for name, digest in zip(hashed, digests, strict=True):
        path = bundle_dir / name
        if digest != manifest.files[name]["sha256"]:
            raise BundleError(f"bundle file {path} does not match its sha256: corrupt")
        record = {"sha256": digest, "stat": states[name]}
        after = _state(path.stat())
        settled = time.time_ns() - after[2] > RACY_SECONDS * 1e9
        if after == states[name] and settled:
            records[name] = record
    if hashed or records.keys() != known.keys():
        manifest_sha256 = sha256_file(bundle_dir / MANIFEST_NAME)
        _write_stamp(stamp, bundle_dir, manifest_sha256, records)
    return hashed
