"""Where inputs come from: folders, globs, list files and tables, streamed as records.

One home for what calibration and the batch tool read. Every source yields `Record`s in a
deterministic order (sorted paths, file order), so runs are repeatable and a resumed run
meets the same items at the same positions; `source_hash` fingerprints a source so a resume
can refuse one that changed. Tables (`.parquet`, `.csv`) need the `batch` extra (pyarrow).

A record that cannot be read (a line that is not UTF-8, a malformed JSON line, a field or id
that is missing, an empty text, a CSV row with the wrong number of fields) raises a
`SourceError` naming its line, or with `on_error="record"` is yielded as a `Record` with
`error` set (its id the line or row number), so a batch job writes an error row and goes on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
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
    error: str | None = None


HASH_MODES = ("stat", "content")


def _bad(path: Path, where: str, reason: str, on_error: str, name: str) -> Record:
    """The record of an input that cannot be read, or its SourceError (on_error="raise")."""
    message = f"{path}:{where}: {reason}"
    if on_error == "raise":
        raise SourceError(message)
    return Record(name, None, {}, message)


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


def _table(
    path: Path, columns: Sequence[str | None], bad_rows: list | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet or CSV table as dicts, read in batches (bounded memory). CSV rows with
    the wrong number of fields go to `bad_rows` as (line number, text) when it is given."""
    try:
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("reading tables needs pyarrow: pip install 'clipedge[batch]'") from exc
    if path.suffix.lower() == ".parquet":
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096)
    else:

        def invalid(row) -> str:
            if bad_rows is None:
                return "error"
            bad_rows.append((row.number, row.text))
            return "skip"

        parse = pyarrow.csv.ParseOptions(invalid_row_handler=invalid)
        try:
            batches = pyarrow.csv.open_csv(path, parse_options=parse)
        except pyarrow.ArrowInvalid as exc:
            raise SourceError(f"{path}: {exc}") from exc
    count = 0  # rows yielded, skipped CSV rows included
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pyarrow.ArrowInvalid as exc:
            raise SourceError(f"{path}: {exc}") from exc
        names = batch.schema.names
        missing = [c for c in columns if c is not None and c not in names]
        if missing:
            raise SourceError(f"{path} has no column {missing[0]!r} (columns: {names})")
        if not bad_rows:
            count += batch.num_rows
            yield from batch.to_pylist()
            continue
        # A skipped CSV row goes back in its place: data row N is on line N + 2 (the header
        # is line 1) unless values span lines; those without a number follow the block.
        bad = sorted(bad_rows, key=lambda entry: entry[0] or 1 << 62)
        bad_rows.clear()
        for row in batch.to_pylist():
            while bad and bad[0][0] is not None and bad[0][0] - 2 <= count:
                count += 1
                yield {"\0bad": bad.pop(0)}
            count += 1
            yield row
        for entry in bad:
            count += 1
            yield {"\0bad": entry}


def _table_records(
    path: Path,
    column: str,
    id_column: str | None,
    keep: Sequence[str],
    on_error: str = "raise",
    text: bool = False,
) -> Iterator[Record]:
    """A table's records; ids are `id_column`'s values or the row number (from 0). A CSV row
    that cannot be parsed is an error record, in its place where pyarrow gives its line
    number, else after the rows of its read block (the streaming reader gives none)."""
    rows = _table(path, [column, id_column, *keep], [] if on_error == "record" else None)
    for number, row in enumerate(rows):
        if "\0bad" in row:
            line, content = row["\0bad"]
            where = f"line {line}" if line else f"row {number}"
            reason = f"cannot parse the row {content[:80]!r}"
            yield _bad(path, where, reason, on_error, str(number))
        elif id_column and row[id_column] is None:
            yield _bad(path, f"row {number}", f"no {id_column!r} value", on_error, str(number))
        elif text and row[column] == "":
            name = str(row[id_column] if id_column else number)
            yield _bad(path, f"row {number}", "empty text", on_error, name)
        else:
            name = row[id_column] if id_column else number
            yield Record(str(name), row[column], {k: row[k] for k in keep})


def image_records(
    spec: str | Path,
    column: str = "image",
    id_column: str | None = None,
    keep: Sequence[str] = (),
    on_error: str = "raise",
) -> Iterator[Record]:
    """Images from a folder, a glob, a list file (one path or URL a line) or a table with
    a path / URL / bytes `column`; ids are the paths, absolute (the list file's lines as they
    are; or `id_column`, or the row number)."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        yield from _table_records(path, column, id_column, keep, on_error)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        for _, line in _lines(path, on_error):
            if isinstance(line, Record):
                yield line
            elif line.strip():
                yield Record(line.strip(), line.strip())
    else:
        paths = image_paths(spec)
        if not paths:
            raise SourceError(f"no images found for {spec!r}")
        for item in paths:
            item = Path(os.path.abspath(item))
            yield Record(str(item), item)


def _lines(path: Path, on_error: str) -> Iterator[tuple[int, Any]]:
    """(line number, text) of a file, read as bytes so that a line that is not UTF-8 is one
    error record (in place of the text), not the end of the file."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 ({exc.reason} at byte {exc.start})"
                yield number, _bad(path, f"line {number}", reason, on_error, str(number))


def text_records(
    spec: str | Path,
    column: str = "text",
    id_column: str | None = None,
    keep: Sequence[str] = (),
    on_error: str = "raise",
) -> Iterator[Record]:
    """Texts from `.txt` (a line each; blank lines skipped), `.jsonl` (`column` field), `.csv`
    or `.parquet`; ids are `id_column`'s values or the line / row number."""
    path = Path(spec)
    if not path.is_file():
        raise SourceError(f"text source {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        yield from _table_records(path, column, id_column, keep, on_error, text=True)
        return
    for number, line in _lines(path, on_error):
        if isinstance(line, Record):
            yield line
        elif not line.strip():
            continue
        elif suffix != ".jsonl":
            yield Record(str(number), line.rstrip("\r\n"))
        else:
            yield _json_record(path, number, line, column, id_column, keep, on_error)


def _json_record(
    path: Path,
    number: int,
    line: str,
    column: str,
    id_column: str | None,
    keep: Sequence[str],
    on_error: str,
) -> Record:
    where = f"line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return _bad(path, where, f"not JSON ({exc})", on_error, str(number))
    if not isinstance(row, dict):
        reason = f"not a JSON object ({type(row).__name__})"
        return _bad(path, where, reason, on_error, str(number))
    if column not in row:
        return _bad(path, where, f"no {column!r} field", on_error, str(number))
    if id_column and row.get(id_column) is None:
        return _bad(path, where, f"no {id_column!r} field", on_error, str(number))
    if row[column] == "":
        return _bad(path, where, "empty text", on_error, str(row.get(id_column, number)))
    name = row[id_column] if id_column else number
    return Record(str(name), row[column], {k: row.get(k) for k in keep})


def source_path(spec: str | Path) -> str:
    """The source as an absolute path (a relative path and its absolute form are one source)."""
    return os.path.abspath(spec)


def source_hash(spec: str | Path, mode: str = "stat") -> str:
    """A file's sha256; for folders and globs, that of the sorted absolute paths with sizes
    and modification times (`mode="stat"`) or with each file's sha256 (`mode="content"`:
    files touched without a change keep the hash)."""
    if mode not in HASH_MODES:
        raise ValueError(f"hash mode must be one of {HASH_MODES}, got {mode!r}")
    path = Path(spec)
    if path.is_file():
        return _file_hash(path).hex()
    digest = hashlib.sha256()
    for item in image_paths(spec):
        item = Path(os.path.abspath(item))
        if mode == "content":
            digest.update(f"{item}\0".encode() + _file_hash(item) + b"\n")
        else:
            stat = item.stat()
            digest.update(f"{item}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.digest()
