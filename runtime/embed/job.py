"""One `clipedge embed` run: records -> prepared batches -> the model -> Parquet shards."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import select
import signal
import threading
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
from clipedge.inputs.sources import (
    HASH_MODES,
    Record,
    image_records,
    source_hash,
    source_path,
    text_records,
)
from clipedge.options import Options
from clipedge.towers import TEXT, VISION, Prepared, open_towers

from . import shards

KINDS = {"images": VISION.name, "texts": TEXT.name}


class EmbedError(ClipEdgeError, RuntimeError):
    """The run cannot start or go on (changed source, --fail-fast on a bad input, ...)."""


@dataclass(frozen=True)
class EmbedJob:
    """What to embed, where to, and how. `column` / `id_column` / `keep` name table columns
    (defaults: "image" or "text", the row number, none). `hash`: how a folder source is
    fingerprinted for resumes ("stat": paths, sizes and mtimes; "content": the files' bytes).
    `to`: a vector store the ok rows are upserted into at the end (`clipedge.embed.stores`)."""

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
    hash: str = "stat"
    to: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OptionError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.dtype not in shards.DTYPES:
            raise OptionError(f"dtype must be one of {list(shards.DTYPES)}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise OptionError("shard_size and batch_size must be >= 1, workers >= 0")
        if self.hash not in HASH_MODES:
            raise OptionError(f"hash must be one of {list(HASH_MODES)}, got {self.hash!r}")
        if self.to is not None:
            from .stores import parse_target

            parse_target(self.to)

    def records(self) -> Iterator[Record]:
        read = image_records if self.kind == "images" else text_records
        column = self.column or ("image" if self.kind == "images" else "text")
        on_error = "raise" if self.fail_fast else "record"
        return read(self.source, column, self.id_column, self.keep, on_error)


@dataclass
class EmbedSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    output_bytes: int = 0
    delivered: int | None = None

    @property
    def rate(self) -> float:
        return (self.done + self.failed) / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        delivered = "" if self.delivered is None else f", {self.delivered} rows upserted"
        return (
            f"embedded {self.done}, failed {self.failed}, skipped {self.skipped} (finished "
            f"shards), {self.rate:.1f} items/s, output {self.output_bytes / 1e6:.1f} MB"
            f"{delivered}"
        )


# ----- preparation in worker processes -------------------------------------------------

_worker: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker ends when the job's process dies, however it dies (SIGKILL included).

    Two guards. PR_SET_PDEATHSIG (Linux) has the kernel send SIGKILL when the worker's parent
    *thread* ends: that is the job's process only when it forked the worker itself (the
    "fork" start method; under "forkserver", Python 3.14's default on Linux, the parent is the
    fork server). So a watcher thread also waits on the job's process itself (a pidfd; or a
    poll every 0.2 s where there is none) and ends the worker the moment it is gone.
    """
    if os.getppid() == parent:
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None
    if not _alive(parent):  # the job died before the guards were in place
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, pidfd), daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent: int, pidfd: int | None) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable when the process has ended
    else:
        while _alive(parent) and os.getppid() != 1:
            time.sleep(0.2)
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
        "source": source_path(job.source),
        "source_sha256": source_hash(job.source, job.hash),
        "hash": job.hash,
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
    previous.setdefault("hash", "stat")  # manifests written before --hash
    previous["source"] = source_path(previous.get("source", ""))
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
        self.dim = self.options.truncate_dim or self.model.manifest.embed_dim

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

    def embed_records(self, records: list[Record]) -> tuple[np.ndarray, list[str | None]]:
        """Vectors and error reasons of records; those the source could not read keep their
        reason (and a zero vector) and never reach the model."""
        valid = [i for i, record in enumerate(records) if record.error is None]
        embedded = self.embed_items([records[i].item for i in valid]) if valid else None
        return self.scatter(records, valid, embedded)

    def scatter(
        self,
        records: list[Record],
        valid: list[int],
        embedded: tuple[np.ndarray, list[str | None]] | None,
    ) -> tuple[np.ndarray, list[str | None]]:
        """The results of the `valid` records back in their places among all `records`."""
        vectors = np.zeros((len(records), self.dim), np.float32)
        errors: list[str | None] = [record.error for record in records]
        if embedded is not None:
            vectors[valid] = embedded[0]
            for position, error in zip(valid, embedded[1], strict=True):
                errors[position] = error
        return vectors, errors


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
        last_run = asdict(summary) | {"rate": summary.rate}
        del last_run["delivered"]
        counts = shards.count_rows(job.out_dir)
        shards.write_manifest(
            job.out_dir, {**manifest, "complete": True, "counts": counts, "last_run": last_run}
        )
        if job.to is not None:
            from .stores import deliver

            summary.delivered = deliver(job.out_dir, job.to, job.keep)
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
                (shard, records, last), (valid, future) = pending.popleft()
                for entry in itertools.islice(batches, 1):
                    pending.append((entry, self._submit(executor, entry[1], uses_workers)))
                embedded = self.embed_prepared(future.result()) if valid else None
                vectors, errors = self.scatter(records, valid, embedded)
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
            {k: [r.get(k) for r in rows["keep"]] for k in self.job.keep},
            self.job.dtype,
        )
        summary.output_bytes += path.stat().st_size

    def _submit(self, executor: Executor, records: list[Record], uses_workers: bool):
        """(positions of the readable records, the future of their preparation)."""
        valid = [i for i, record in enumerate(records) if record.error is None]
        if not valid:
            return valid, None
        items = [records[i].item for i in valid]
        prepare = _prepare_in_worker if uses_workers else self._prepare
        return valid, executor.submit(prepare, items, 0)

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
