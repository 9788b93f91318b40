"""Beyond one machine: the same embedding as a Ray Data callable class, and `--ray` runs.

`EmbedBatch` is what `Dataset.map_batches` takes (a pool of `concurrency` actors, `num_gpus`
each when the cluster has GPUs): each actor loads the bundle once and each call embeds one
batch of image paths, URLs or bytes, or texts, returning the rows `clipedge embed` writes,
errors as rows. `RayRunner` sends each unfinished shard through such a pool and writes the
same Parquet shards and manifest as a local run, so runs resume alike. Needs the `ray` extra.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from .job import Embedder, EmbedJob, EmbedSummary, Runner, empty_rows


class EmbedBatch:
    """Callable class for `ray.data.Dataset.map_batches`: {"pos", "item"} batches in,
    {"pos", "embedding", "error"} out (`error` None where the item embedded)."""

    def __init__(self, job: EmbedJob) -> None:
        self.embedder = Embedder(job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items = [item.item() if isinstance(item, np.generic) else item for item in batch["item"]]
        vectors, errors = self.embedder.embed_items(items)
        return {"pos": batch["pos"], "embedding": list(vectors), "error": errors}


class RayRunner(Runner):
    """A `Runner` whose batches are embedded by Ray actors (local or on a cluster)."""

    def __init__(self, job: EmbedJob, address: str | None, progress: bool | None = None) -> None:
        super().__init__(dataclasses.replace(job, workers=0), progress)
        self.address = address

    def _embed_all(self, done: set[int], summary: EmbedSummary, bar) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        gpus = 1 if resources.get("GPU") else 0
        actors = int(resources.get("GPU") or max(1, resources.get("CPU", 1) // 2))
        records = self.job.records()
        for shard in itertools.count():
            chunk = list(itertools.islice(records, self.job.shard_size))
            if not chunk:
                return
            if shard in done:
                summary.skipped += len(chunk)
                continue
            dataset = ray.data.from_items([{"pos": i, "item": r.item} for i, r in enumerate(chunk)])
            results = dataset.map_batches(
                EmbedBatch,
                fn_constructor_kwargs={"job": self.job},
                batch_size=self.job.batch_size,
                concurrency=actors,
                num_gpus=gpus,
            ).take_all()
            results.sort(key=lambda row: row["pos"])
            vectors = np.stack([np.asarray(row["embedding"], np.float32) for row in results])
            rows = empty_rows()
            self._collect(rows, chunk, vectors, [row["error"] for row in results], summary)
            self._write(shard, rows, summary)
            bar.update(len(chunk))


def embed_with_ray(
    job: EmbedJob, address: str | None = None, progress: bool | None = None
) -> EmbedSummary:
    """Run (or resume) a job on Ray: `address` of a cluster, or None for a local instance."""
    return RayRunner(job, address, progress).run()
