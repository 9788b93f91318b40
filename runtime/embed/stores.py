"""`clipedge embed --to`: the ok rows of an output folder upserted into a vector store.

`lancedb://PATH/TABLE` (a LanceDB database folder; `lancedb:///abs/path/TABLE`),
`qdrant://HOST:PORT/COLLECTION` (a Qdrant server) or `qdrant:///local/path/COLLECTION`
(Qdrant's local mode, a folder). Each shard's ok rows go in as they are in the Parquet output
(failed rows, with their null vectors, stay out): the id, the vector, `status` and the
`--keep` columns. Upserts are keyed on the row id, so delivering a folder again (a resumed
run) leaves one entry per input: LanceDB merges on `id`; Qdrant's point id is
`point_id(id)`, a uuid5 of the row id (Qdrant takes only integers and UUIDs), and the row id
itself is in the payload as `id`. Needs the `lancedb` or `qdrant` extra.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipedge.errors import OptionError

SCHEMES = ("lancedb", "qdrant")
# Fixed, so that the same row id is the same point in every run and every collection.
POINT_NAMESPACE = uuid.UUID("6c1d8f0e-6b8e-5d4c-9a51-636c69706564")
QDRANT_BATCH = 512


@dataclass(frozen=True)
class Target:
    scheme: str
    location: str  # a folder, or host:port
    name: str  # the table or collection
    local: bool


def parse_target(url: str) -> Target:
    """A `--to` URL; an `OptionError` that shows the accepted forms for anything else."""
    scheme, sep, rest = url.partition("://")
    location, _, name = rest.rpartition("/")
    if not sep or scheme not in SCHEMES or not location or not name:
        raise OptionError(
            f"--to must be lancedb://PATH/TABLE, qdrant://HOST:PORT/COLLECTION or "
            f"qdrant:///local/path/COLLECTION, got {url!r}"
        )
    local = scheme == "lancedb" or location.startswith("/")
    return Target(scheme, location, name, local)


def point_id(row_id: str) -> str:
    """The Qdrant point id of a row id (deterministic: an upsert of the same row replaces it)."""
    return str(uuid.uuid5(POINT_NAMESPACE, row_id))


def ok_rows(out_dir: Path) -> Iterator[pa.Table]:
    """Each shard's ok rows: id, embedding, status and the kept columns (no error column)."""
    for path in sorted(Path(out_dir).glob("part-*.parquet")):
        table = pq.read_table(path)
        table = table.filter(pc.equal(table["status"], "ok")).drop_columns(["error"])
        if table.num_rows:
            yield table


def deliver(out_dir: Path, url: str, keep: Sequence[str] = ()) -> int:
    """Upsert the ok rows of `out_dir` into the store `url`; the rows written."""
    target = parse_target(url)
    write = _lancedb if target.scheme == "lancedb" else _qdrant
    return write(target, ok_rows(out_dir))


def _lancedb(target: Target, tables: Iterator[pa.Table]) -> int:
    import lancedb

    db = lancedb.connect(target.location)
    table = None
    written = 0
    for shard in tables:
        if table is None:
            try:
                table = db.open_table(target.name)
            except (ValueError, FileNotFoundError):  # not there yet
                table = db.create_table(target.name, shard)
                written += shard.num_rows
                continue
        (
            table.merge_insert("id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(shard)
        )
        written += shard.num_rows
    return written


def _qdrant(target: Target, tables: Iterator[pa.Table]) -> int:
    from qdrant_client import QdrantClient
    from qdrant_client.models import Distance, PointStruct, VectorParams

    if target.local:
        client = QdrantClient(path=target.location)
    else:
        host, _, port = target.location.rpartition(":")
        client = QdrantClient(host=host or port, port=int(port) if host else 6333)
    written = 0
    try:
        for shard in tables:
            vectors = np.stack(shard["embedding"].to_numpy(zero_copy_only=False))
            vectors = vectors.astype(np.float32)
            if not client.collection_exists(target.name):
                params = VectorParams(size=vectors.shape[1], distance=Distance.COSINE)
                client.create_collection(target.name, vectors_config=params)
            payloads = shard.drop_columns(["embedding"]).to_pylist()
            for start in range(0, len(payloads), QDRANT_BATCH):
                points = [
                    PointStruct(id=point_id(p["id"]), vector=v.tolist(), payload=p)
                    for p, v in zip(
                        payloads[start : start + QDRANT_BATCH],
                        vectors[start : start + QDRANT_BATCH],
                        strict=True,
                    )
                ]
                client.upsert(target.name, points)
            written += len(payloads)
    finally:
        client.close()
    return written
