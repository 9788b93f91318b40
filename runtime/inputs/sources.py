"""Where inputs come from: folders, globs, list files and tables, streamed as records.

One home for what calibration and the batch tool read. Every source yields `Record`s in a
deterministic order (sorted paths, file order), so runs are repeatable and a resumed run
meets the same items at the same positions; `source_hash` fingerprints a source so a resume
can refuse one that changed. Tables (`.parquet`, `.csv`) need the `batch` extra (pyarrow).
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SourceError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".lst"}
TABLE_SUFFIXES = {".parquet", ".csv"}


@dataclass(frozen=True)
class Record:
    """One input: its id, the item the runtime embeds (path, URL, bytes or text) and the
    source columns to keep beside the embedding."""

    id: str
    item: Any
    keep: dict[str, Any] = field(default_factory=dict)


def image_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Sorted image paths of a folder (recursive), a glob or a list of paths."""
    if not isinstance(spec, str | Path):
        paths = [Path(p) for p in spec]
    else:
        path = Path(spec)
        if path.is_dir():
            paths = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            paths = [path]
        else:
            paths = [Path(p) for p in glob.glob(str(spec), recursive=True)]
    return sorted(set(paths))


def _table(path: Path, columns: Sequence[str | None]) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet or CSV table as dicts, read in batches (bounded memory)."""
    try:
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("reading tables needs pyarrow: pip install 'clipedge[batch]'") from exc
    if path.suffix.lower() == ".parquet":
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096)
    else:
        batches = pyarrow.csv.open_csv(path)
    for batch in batches:
        names = batch.schema.names
        missing = [c for c in columns if c is not None and c not in names]
        if missing:
            raise SourceError(f"{path} has no column {missing[0]!r} (columns: {names})")
        yield from batch.to_pylist()


def _table_records(
    path: Path, column: str, id_column: str | None, keep: Sequence[str]
) -> Iterator[Record]:
    for number, row in enumerate(_table(path, [column, id_column, *keep])):
        name = row[id_column] if id_column else number
        yield Record(str(name), row[column], {k: row[k] for k in keep})


def image_records(
    spec: str | Path,
    column: str = "image",
    id_column: str | None = None,
    keep: Sequence[str] = (),
) -> Iterator[Record]:
    """Images from a folder, a glob, a list file (one path or URL a line) or a table with
    a path / URL / bytes `column`; ids are the paths (or `id_column`, or the row number)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        yield from _table_records(path, column, id_column, keep)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        with path.open(encoding="utf-8") as stream:
            for line in stream:
                if line.strip():
                    yield Record(line.strip(), line.strip())
    else:
        paths = image_paths(spec)
        if not paths:
            raise SourceError(f"no images found for {spec!r}")
        for item in paths:
            yield Record(str(item), item)


def text_records(
    spec: str | Path,
    column: str = "text",
    id_column: str | None = None,
    keep: Sequence[str] = (),
) -> Iterator[Record]:
    """Texts from `.txt` (a line each), `.jsonl` (`column` field), `.csv` or `.parquet`;
    ids are `id_column`'s values or the line / row number."""
    path = Path(spec)
    if not path.is_file():
        raise SourceError(f"text source {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        yield from _table_records(path, column, id_column, keep)
        return
    with path.open(encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            if suffix != ".jsonl":
                yield Record(str(number), line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
                text = row[column]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SourceError(f"{path}:{number}: no {column!r} field ({exc})") from exc
            name = row.get(id_column, number) if id_column else number
            yield Record(str(name), text, {k: row.get(k) for k in keep})


def source_hash(spec: str | Path) -> str:
    """A file's sha256; for folders and globs, that of the sorted paths with sizes and times."""
    path = Path(spec)
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    else:
        for item in image_paths(spec):
            stat = item.stat()
            digest.update(f"{item}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
