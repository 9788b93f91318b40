"""Parquet shards: written under a temporary name and renamed, so a shard file that exists is
complete; the run's manifest says what the shards hold and what they were made from."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The leading underscore keeps it out of `pyarrow.parquet.read_table(out_dir)` (like _SUCCESS).
MANIFEST = "_clipedge-embed.json"
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"part-{index:05d}.parquet"


def done_shards(out_dir: Path) -> set[int]:
    """Indices of complete shards; leftover temporary files of a killed run are removed."""
    for partial in out_dir.glob("part-*.parquet.tmp"):
        partial.unlink()
    return {int(p.name[5:10]) for p in out_dir.glob("part-*.parquet")}


def schema(dim: int, dtype: str, keep: dict[str, pa.DataType]) -> pa.Schema:
    """id, embedding as fixed_size_list<dtype, dim> (what LanceDB and Qdrant take as is),
    status, error, then the kept source columns."""
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(DTYPES[dtype], dim)),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields + [pa.field(name, kind) for name, kind in keep.items()])


def write_shard(
    out_dir: Path,
    index: int,
    ids: Sequence[str],
    vectors: np.ndarray,
    errors: Sequence[str | None],
    keep: dict[str, list[Any]],
    dtype: str,
) -> Path:
    """One shard: a row per input; failed rows have a null embedding and their reason."""
    dim = vectors.shape[1]
    flat = pa.array(vectors.astype(dtype).reshape(-1), type=DTYPES[dtype])
    mask = pa.array([error is not None for error in errors])
    embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)
    columns = {
        "id": pa.array(list(ids), pa.string()),
        "embedding": embedding,
        "status": pa.array(["ok" if e is None else "error" for e in errors], pa.string()),
        "error": pa.array(list(errors), pa.string()),
        **{name: pa.array(values) for name, values in keep.items()},
    }
    table = pa.table(columns)
    final = shard_path(out_dir, index)
    partial = final.with_name(final.name + ".tmp")
    pq.write_table(table, partial)
    os.replace(partial, final)
    return final


def count_rows(out_dir: Path) -> dict[str, int]:
    """Rows, ok (`done`) and error (`failed`) rows and shards of the whole output (every run
    that wrote into it), read from the shards' status column."""
    counts = {"rows": 0, "done": 0, "failed": 0, "shards": 0, "output_bytes": 0}
    for path in sorted(out_dir.glob("part-*.parquet")):
        status = pq.read_table(path, columns=["status"])["status"].to_pylist()
        counts["rows"] += len(status)
        counts["done"] += status.count("ok")
        counts["failed"] += len(status) - status.count("ok")
        counts["shards"] += 1
        counts["output_bytes"] += path.stat().st_size
    return counts


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    partial = out_dir / (MANIFEST + ".tmp")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, out_dir / MANIFEST)
