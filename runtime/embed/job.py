"""One `clipedge embed` run: records -> prepared batches -> the model -> Parquet shards."""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import signal
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import clipedge
from clipedge.bundle.manifest import read_manifest
from clipedge.engine.openvino_backend import OpenVinoOptions
from clipedge.engine.plan import choose_backend
from clipedge.errors import ClipEdgeError, OptionError
from clipedge.inputs.sources import Record, image_records, source_hash, text_records
from clipedge.options import Options
from clipedge.towers import TEXT, VISION, Prepared, open_towers

from . import shards

KINDS = {"images": VISION.name, "texts": TEXT.name}


class EmbedError(ClipEdgeError, RuntimeError):
    """The run cannot start or go on (changed source, --fail-fast on a bad input, ...)."""


@dataclass(frozen=True)
class EmbedJob:
    """What to embed, where to, and how. `column` / `id_column` / `keep` name table columns
    (defaults: "image" or "text", the row number, none)."""

    bundle: Path
    source: str
    kind: str
    out_dir: Path
    dimensions: int | None = None
    task: str | None = None
    batch_size: int = 16
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_size: int = 10_000
    dtype: str = "float32"
    fail_fast: bool = False
    column: str | None = None
    id_column: str | None = None
    keep: tuple[str, ...] = ()
    backend: str = "auto"
    precision: str | None = None
    options: Options = field(default_factory=Options)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OptionError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.dtype not in shards.DTYPES:
            raise OptionError(f"dtype must be one of {list(shards.DTYPES)}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise OptionError("shard_size and batch_size must be >= 1, workers >= 0")

    def records(self) -> Iterator[Record]:
        read = image_records if self.kind == "images" else text_records
        column = self.column or ("image" if self.kind == "images" else "text")
        return read(self.source, column, self.id_column, self.keep)


@dataclass
class EmbedSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    output_bytes: int = 0

    @property
    def rate(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"embedded {self.done}, failed {self.failed}, skipped {self.skipped} (finished "
            f"shards), {self.rate:.1f} items/s, output {self.output_bytes / 1e6:.1f} MB"
        )


# ----- preparation in worker processes -------------------------------------------------

_worker: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker ends when the job's process dies, however it dies (Linux: the kernel sends
    SIGKILL; elsewhere the parent's normal exit shuts the pool down)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(bundle: str, tower: str, options: Options, parent: int) -> None:
    """Build the same tower object, with the same options, as the job's own process."""
    _die_with_parent(parent)
    one_thread = options.replace(preprocess_workers=1)
    _worker["tower"] = open_towers(read_manifest(Path(bundle)), Path(bundle), one_thread)[tower]


def _prepare_in_worker(items: list[Any], offset: int) -> Prepared:
    return _worker["tower"].prepare(items, offset)


def _bundle_hash(bundle: Path) -> str:
    return hashlib.sha256((bundle / "clipedge.json").read_bytes()).hexdigest()


def _run_manifest(job: EmbedJob, model: clipedge.ClipEdgeModel) -> dict[str, Any]:
    """What the shards are made of: a resume must find exactly this again."""
    return {
        "format": "clipedge-embed",
        "bundle_sha256": _bundle_hash(job.bundle),
        "model": "jina-clip-v2",
        "precision": model.precisions[KINDS[job.kind]],
        "kind": job.kind,
        "source": str(job.source),
        "source_sha256": source_hash(job.source),
        "dimensions": job.dimensions or model.manifest.embed_dim,
        "task": job.task,
        "shard_size": job.shard_size,
        "dtype": job.dtype,
        "columns": {"item": job.column, "id": job.id_column, "keep": list(job.keep)},
        "max_length": model.towers[TEXT.name].default_max_length if job.kind == "texts" else None,
    }


def _check_resume(out_dir: Path, expected: dict[str, Any]) -> None:
    previous = shards.read_manifest(out_dir)
    if previous is None:
        if any(out_dir.glob("part-*.parquet")):
            raise EmbedError(f"{out_dir} holds shards but no {shards.MANIFEST}: not resuming")
        return
    changed = [k for k in expected if previous.get(k) != expected[k]]
    if changed:
        key = changed[0]
        what = (
            "the source changed since the first run"
            if key == "source_sha256"
            else (f"{key} was {previous.get(key)!r}, now {expected[key]!r}")
        )
        raise EmbedError(
            f"cannot resume into {out_dir}: {what}. Use a new output folder (or delete this one)"
        )


class Embedder:
    """The job's model and its prepare and embed steps, one batch of records at a time (what
    a local run and a Ray actor share)."""

    def __init__(self, job: EmbedJob) -> None:
        self.job = job
        # A job of batch calls only: under OpenVINO it runs in throughput mode (streams: texts/s
        # +7-12 % at batch 8-32 on 2 vCPUs, images/s +0-10 %; a lone call would run at half
        # speed). The backend is looked up first so that the model is opened once, with its
        # options; the load itself says (once) if the requested backend falls back.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            openvino = choose_backend(job.backend, read_manifest(Path(job.bundle))) == "openvino"
        self.model = clipedge.load(
            job.bundle,
            backend="openvino" if openvino else job.backend,
            precision=job.precision,
            options=job.options,
            backend_options=OpenVinoOptions(mode="throughput") if openvino else None,
        )
        self.tower = self.model.tower(KINDS[job.kind])
        self.options = self.model.finish_options(job.dimensions, True, option="dimensions")

    def _executor(self) -> Executor:
        if self.job.kind == "images" and self.job.workers > 0:
            return ProcessPoolExecutor(
                self.job.workers,
                initializer=_init_worker,
                initargs=(str(self.job.bundle), VISION.name, self.job.options, os.getpid()),
            )
        return ThreadPoolExecutor(1)

    def _prepare(self, items: list[Any], offset: int = 0) -> Prepared:
        """In-process preparation: texts (fast), or images with workers=0."""
        if self.job.kind == "texts":
            return self.tower.prepare(items, offset, task=self.job.task)
        return self.tower.prepare(items, offset)

    def embed_prepared(self, prepared: Prepared) -> tuple[np.ndarray, list[str | None]]:
        """Vectors and per-item error reasons (an item's failure never costs another)."""
        pipeline = self.model.pipeline(self.tower.spec.name)
        embedded = pipeline.embed(prepared, self.job.batch_size, self.options)
        return embedded.vectors, [_reason(error) for error in embedded.errors]

    def embed_items(self, items: list[Any]) -> tuple[np.ndarray, list[str | None]]:
        """Vectors and per-item error reasons for one batch of items, prepared here."""
        return self.embed_prepared(self._prepare(items))


def _reason(error: ClipEdgeError | None) -> str | None:
    if error is None:
        return None
    return getattr(error, "reason", None) or str(error)


def empty_rows() -> dict[str, list]:
    return {"ids": [], "vectors": [], "errors": [], "keep": []}


class Runner(Embedder):
    """Runs one job locally; `run()` returns the summary."""

    def __init__(self, job: EmbedJob, progress: bool | None = None) -> None:
        super().__init__(job)
        self.progress = progress

    def _batches(self, done: set[int], summary: EmbedSummary):
        """(shard index, records of one batch, last batch of the shard?) for unfinished shards."""
        records = self.job.records()
        for index in itertools.count():
            chunk = list(itertools.islice(records, self.job.shard_size))
            if not chunk:
                return
            if index in done:
                summary.skipped += len(chunk)
                continue
            size = self.job.batch_size * (4 if self.job.kind == "texts" else 1)
            starts = range(0, len(chunk), size)
            for start in starts:
                yield index, chunk[start : start + size], start == starts[-1]

    def run(self) -> EmbedSummary:
        job = self.job
        job.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = _run_manifest(job, self.model)
        _check_resume(job.out_dir, manifest)
        shards.write_manifest(job.out_dir, {**manifest, "complete": False})
        done = shards.done_shards(job.out_dir)
        summary = EmbedSummary()
        started = time.monotonic()
        from tqdm.auto import tqdm

        with tqdm(
            desc=f"clipedge embed {job.kind}", unit="item", disable=self.progress is False
        ) as bar:
            self._embed_all(done, summary, bar)
        summary.seconds = time.monotonic() - started
        shards.write_manifest(
            job.out_dir,
            {**manifest, "complete": True, "counts": asdict(summary) | {"rate": summary.rate}},
        )
        return summary

    def _embed_all(self, done: set[int], summary: EmbedSummary, bar) -> None:
        """Every unfinished shard; preparation runs `2 x workers` batches ahead."""
        pending: deque = deque()
        rows = empty_rows()
        with self._executor() as executor:
            uses_workers = isinstance(executor, ProcessPoolExecutor)
            batches = self._batches(done, summary)
            for entry in itertools.islice(batches, 2 * max(1, self.job.workers)):
                pending.append((entry, self._submit(executor, entry[1], uses_workers)))
            while pending:
                (shard, records, last), future = pending.popleft()
                for entry in itertools.islice(batches, 1):
                    pending.append((entry, self._submit(executor, entry[1], uses_workers)))
                vectors, errors = self.embed_prepared(future.result())
                self._collect(rows, records, vectors, errors, summary)
                bar.update(len(records))
                if last:
                    self._write(shard, rows, summary)
                    rows = empty_rows()

    def _write(self, shard: int, rows: dict[str, list], summary: EmbedSummary) -> None:
        path = shards.write_shard(
            self.job.out_dir,
            shard,
            rows["ids"],
            np.concatenate(rows["vectors"]),
            rows["errors"],
            {k: [r[k] for r in rows["keep"]] for k in self.job.keep},
            self.job.dtype,
        )
        summary.output_bytes += path.stat().st_size

    def _submit(self, executor: Executor, records: list[Record], uses_workers: bool):
        items = [r.item for r in records]
        return executor.submit(_prepare_in_worker if uses_workers else self._prepare, items, 0)

    def _collect(self, rows, records, vectors, errors, summary: EmbedSummary) -> None:
        for record, error in zip(records, errors, strict=True):
            if error is not None and self.job.fail_fast:
                raise EmbedError(f"input {record.id}: {error} (--fail-fast)")
            summary.done += error is None
            summary.failed += error is not None
        rows["ids"].extend(r.id for r in records)
        rows["vectors"].append(vectors)
        rows["errors"].extend(errors)
        rows["keep"].extend(r.keep for r in records)


def embed(job: EmbedJob, progress: bool | None = None) -> EmbedSummary:
    """Run (or resume) a job; see `EmbedJob`."""
    return Runner(job, progress).run()
