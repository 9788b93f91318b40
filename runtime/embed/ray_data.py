"""Beyond one machine: the same embedding as a Ray Data callable class, and `--ray` runs.

`EmbedBatch` is what `Dataset.map_batches` takes (a pool of actors, one GPU each when the
cluster has GPUs): each actor loads the bundle once, and each call embeds one Arrow batch of
records (`id`, `item` text / path / URL or `item_bytes`, `source_error`, any other columns
pass through) and returns it with `embedding` (fixed_size_list<float32, dim>, null where the
item failed) and `error` in place of the item columns: plain Arrow types, never pickled
objects.

`RayRunner` reads the source once, in the driver, into one Arrow block per unfinished shard
(the records, not the images: paths, URLs or texts), builds one dataset over all of them and
streams it through one actor pool; rows come back in any order, carrying their shard and
position, and a shard is written (the same Parquet file a local run writes, under a temporary
name then renamed) as soon as all its rows are back. Finished shards are skipped, so runs
resume alike, locally or on Ray. Needs the `ray` extra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipedge.inputs.sources import Record

from . import shards
from .job import Embedder, EmbedError, EmbedJob, EmbedSummary, Runner
from .reaper import reaping

ITEM_COLUMNS = ("item", "item_bytes", "source_error")
# Rows per actor call: enough to keep Ray's per-call cost small beside the model's work
# (the model itself runs `batch_size` rows at a time inside the call).
TEXT_ROWS_PER_CALL = 512
IMAGE_ROWS_PER_CALL = 32


def records_table(shard: int, records: list[Record], keep: tuple[str, ...]) -> pa.Table:
    """One shard's records as an Arrow block with plain types (strings and bytes)."""
    items: list[str | None] = []
    data: list[bytes | None] = []
    errors: list[str | None] = []
    for record in records:
        item, error = record.item, record.error
        if error is None and isinstance(item, bytes | bytearray | memoryview):
            items.append(None)
            data.append(bytes(item))
        elif error is None and isinstance(item, str | os.PathLike):
            items.append(os.fspath(item))
            data.append(None)
        else:
            items.append(None)
            data.append(None)
            errors.append(error or f"expected a text, path or URL, got {type(item).__name__}")
            continue
        errors.append(None)
    columns = {
        "shard": pa.array([shard] * len(records), pa.int32()),
        "pos": pa.array(range(len(records)), pa.int32()),
        "id": pa.array([r.id for r in records], pa.string()),
        "item": pa.array(items, pa.string()),
        "item_bytes": pa.array(data, pa.binary()),
        "source_error": pa.array(errors, pa.string()),
    }
    for name in keep:
        columns[f"keep:{name}"] = pa.array([r.keep.get(name) for r in records])
    return pa.table(columns)


class EmbedBatch:
    """Callable class for `ray.data.Dataset.map_batches(..., batch_format="pyarrow")`: one
    model per actor; Arrow batches of records in, the same rows with `embedding` and `error`
    out (see the module's docstring)."""

    def __init__(self, job: EmbedJob) -> None:
        self.embedder = Embedder(job)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch["item"].to_pylist()
        data = batch["item_bytes"].to_pylist()
        records = [
            Record("", b if b is not None else i, {}, e)
            for i, b, e in zip(items, data, batch["source_error"].to_pylist(), strict=True)
        ]
        vectors, errors = self.embedder.embed_records(records)
        failed = pa.array([error is not None for error in errors])
        flat = pa.array(vectors.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1], mask=failed)
        out = batch.drop_columns(list(ITEM_COLUMNS))
        out = out.append_column("embedding", embedding)
        return out.append_column("error", pa.array(errors, pa.string()))


class RayRunner(Runner):
    """A `Runner` whose records are embedded by one pool of Ray actors (local or a cluster)."""

    def __init__(self, job: EmbedJob, address: str | None, progress: bool | None = None) -> None:
        super().__init__(dataclasses.replace(job, workers=0), progress)
        self.address = address

    def _pool_size(self, ray) -> tuple[int, int]:
        """(actors, GPUs per actor): one actor per GPU, else one per two CPUs (each runs the
        model on its share of the cores; the driver reads and writes beside them)."""
        resources = ray.cluster_resources()
        if resources.get("GPU"):
            return int(resources["GPU"]), 1
        return max(1, int(resources.get("CPU", 1)) // 2), 0

    def _embed_all(self, done: set[int], summary: EmbedSummary, bar) -> None:
        import ray

        own = not ray.is_initialized()
        # a local instance started here is this process's to end, even if it is killed
        with reaping() if own and self.address is None else contextlib.nullcontext():
            if own:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            try:
                self._stream(ray, done, summary, bar)
            finally:
                if own:
                    ray.shutdown()

    def _stream(self, ray, done: set[int], summary: EmbedSummary, bar) -> None:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the run's own bar counts rows
        expected: dict[int, int] = {}
        blocks = []
        records = self.job.records()
        for shard in itertools.count():
            chunk = list(itertools.islice(records, self.job.shard_size))
            if not chunk:
                break
            if shard in done:
                summary.skipped += len(chunk)
                continue
            expected[shard] = len(chunk)
            blocks.append(ray.put(records_table(shard, chunk, self.job.keep)))
            del chunk
        if not blocks:
            return
        actors, gpus = self._pool_size(ray)
        per_call = TEXT_ROWS_PER_CALL if self.job.kind == "texts" else IMAGE_ROWS_PER_CALL
        dataset = ray.data.from_arrow_refs(blocks).map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"job": self.job},
            batch_size=max(per_call, self.job.batch_size),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
        )
        arrived: dict[int, list[pa.Table]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in set(batch["shard"].to_pylist()):
                part = batch.filter(pc.equal(batch["shard"], shard))
                self._arrive(part, summary)
                arrived[shard].append(part)
                counts[shard] += part.num_rows
                if counts[shard] == expected[shard]:
                    self._write_table(shard, pa.concat_tables(arrived.pop(shard)), summary)
            bar.update(batch.num_rows)
        missing = sorted(set(expected) - {s for s in expected if counts[s] == expected[s]})
        if missing:
            raise EmbedError(f"Ray returned no rows for part of shards {missing}")

    def _arrive(self, part: pa.Table, summary: EmbedSummary) -> None:
        errors = part["error"].to_pylist()
        failed = sum(error is not None for error in errors)
        if failed and self.job.fail_fast:
            first = next(i for i, e in enumerate(errors) if e is not None)
            raise EmbedError(f"input {part['id'][first].as_py()}: {errors[first]} (--fail-fast)")
        summary.done += len(errors) - failed
        summary.failed += failed

    def _write_table(self, shard: int, table: pa.Table, summary: EmbedSummary) -> None:
        table = table.sort_by("pos")
        dim = table.schema.field("embedding").type.list_size
        embedding = table["embedding"].combine_chunks()
        # the child values, failed rows' zero slots included (flatten() would drop them)
        flat = embedding.values.slice(embedding.offset * dim, len(embedding) * dim)
        vectors = np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim)
        path = shards.write_shard(
            self.job.out_dir,
            shard,
            table["id"].to_pylist(),
            vectors,
            table["error"].to_pylist(),
            {k: table[f"keep:{k}"].to_pylist() for k in self.job.keep},
            self.job.dtype,
        )
        summary.output_bytes += path.stat().st_size


def embed_with_ray(
    job: EmbedJob, address: str | None = None, progress: bool | None = None
) -> EmbedSummary:
    """Run (or resume) a job on Ray: `address` of a cluster, or None for a local instance."""
    return RayRunner(job, address, progress).run()
