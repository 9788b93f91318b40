"""The bundle's files against the manifest: present, complete and (optionally) unaltered."""

from __future__ import annotations

from pathlib import Path

from .manifest import BundleError, Manifest, sha256_file


def check_files(bundle_dir: Path, manifest: Manifest, verify_checksums: bool = False) -> None:
    """Fail at load time on missing, truncated or (with `verify_checksums`) altered files.

    Sizes are always checked (free); hashing reads every byte (seconds for a full bundle), so
    it is on request: a flipped bit in a graph otherwise shows as non-finite embeddings, which
    the runtime reports with a hint to verify.
    """
    for name, info in manifest.files.items():
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing")
        if path.stat().st_size != info["bytes"]:
            raise BundleError(
                f"bundle file {path} has {path.stat().st_size} bytes, the manifest says "
                f"{info['bytes']}: it is truncated or corrupt"
            )
        if verify_checksums and sha256_file(path) != info["sha256"]:
            raise BundleError(f"bundle file {path} does not match its sha256: corrupt")
