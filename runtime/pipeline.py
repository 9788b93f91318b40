"""The one way a tower's prepared items become embeddings, for every consumer.

rows -> batches that fit the engine's limits (the tower's order, split to the engine's
largest batch, items longer than the engine takes refused alone) -> run -> a failed batch
retried item by item -> finish (pool, NaN/Inf check, Matryoshka, normalisation). `encode_*`,
the server's batcher, `clipedge embed` (local, worker processes, Ray) and `clipedge verify`
all call it, so an engine limit or a bad item is handled the same everywhere: an error for
that item, never a lost neighbour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine.session import NO_LIMITS, EngineLimits, TowerSession
from .errors import (
    BackendError,
    ClipEdgeError,
    EngineLimitError,
    NonFiniteEmbeddingError,
    OptionError,
)
from .postprocess import check_truncate_dim, nonfinite_rows, pool, truncate_and_normalize
from .towers import Prepared, Tower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishOptions:
    """What the caller wants of the vectors; validated once, when made."""

    truncate_dim: int | None
    normalize: bool

    @classmethod
    def checked(
        cls,
        truncate_dim: Any,
        normalize: bool,
        embed_dim: int,
        trained_dims: Collection[int] = (),
        option: str = "truncate_dim",
    ) -> FinishOptions:
        truncate_dim = check_truncate_dim(truncate_dim, embed_dim, trained_dims, option)
        return cls(truncate_dim, bool(normalize))


RAW = FinishOptions(truncate_dim=None, normalize=False)


@dataclass
class TowerBatch:
    """Graph inputs for one run, and for each row the item it belongs to."""

    feeds: dict[str, np.ndarray]
    items: list[int]


@dataclass
class Embedded:
    """Vectors [N, k] float32 (zeros where the item failed) and each item's error (or None)."""

    vectors: np.ndarray
    errors: list[ClipEdgeError | None]

    def first_error(self) -> ClipEdgeError | None:
        """The lowest item's error; NaN/Inf errors of several items as one naming them all."""
        failed = [error for error in self.errors if error is not None]
        if not failed:
            return None
        first = failed[0]
        if isinstance(first, NonFiniteEmbeddingError):
            items = [i for e in failed if isinstance(e, NonFiniteEmbeddingError) for i in e.items]
            return NonFiniteEmbeddingError(first.tower, items)
        return first


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise OptionError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def plan_batches(
    tower: Tower,
    rows: Sequence[Any],
    items: Sequence[int],
    batch_size: int,
    limits: EngineLimits = NO_LIMITS,
    max_batch_tokens: int | None = None,
) -> list[list[int]]:
    """`items` (indices into `rows`) grouped into batches in the tower's order: at most the
    engine's largest batch each and, with `max_batch_tokens`, at most that many padded
    tokens (rows x the batch's longest row; texts run longest first, so long texts get
    small batches; an image counts the tokens it is inside the tower). A row over the budget
    runs alone (`over_limit` refuses such a text first)."""
    size = limits.batch_size(check_batch_size(batch_size))
    chunks: list[list[int]] = []
    chunk: list[int] = []
    widest = 0
    for item in tower.batch_order(rows, items):
        length = (tower.tokens(rows[item]) or 0) if max_batch_tokens else 0
        width = max(widest, length)
        if chunk and (
            len(chunk) >= size or (max_batch_tokens and width * (len(chunk) + 1) > max_batch_tokens)
        ):
            chunks.append(chunk)
            chunk, width = [], length
        chunk.append(item)
        widest = width
    if chunk:
        chunks.append(chunk)
    return chunks


def batches(
    tower: Tower,
    rows: Sequence[Any],
    items: Sequence[int],
    batch_size: int,
    limits: EngineLimits = NO_LIMITS,
    max_batch_tokens: int | None = None,
) -> Iterator[TowerBatch]:
    """Batches of `items` (indices into `rows`) as `plan_batches` groups them, with their
    graph inputs (calibration builds its graph inputs with this too)."""
    for chunk in plan_batches(tower, rows, items, batch_size, limits, max_batch_tokens):
        yield TowerBatch(tower.feeds([rows[i] for i in chunk]), chunk)


class Pipeline:
    """One tower's prepared rows through one session; `max_batch_tokens` caps the padded
    text tokens of one run (None: batches are cut by count only)."""

    def __init__(
        self,
        tower: Tower,
        session: TowerSession,
        embed_dim: int,
        max_batch_tokens: int | None = None,
    ) -> None:
        self.tower = tower
        self.session = session
        self.embed_dim = embed_dim
        self.max_batch_tokens = max_batch_tokens

    @property
    def limits(self) -> EngineLimits:
        return self.session.limits

    def batches(
        self, rows: Sequence[Any], items: Sequence[int], batch_size: int
    ) -> Iterator[TowerBatch]:
        return batches(self.tower, rows, items, batch_size, self.limits, self.max_batch_tokens)

    def plan(
        self,
        rows: Sequence[Any],
        items: Sequence[int],
        batch_size: int,
        max_batch_tokens: int | None = None,
    ) -> list[list[int]]:
        """How `run_rows` would group `items` into batches (a server's batcher runs them);
        `max_batch_tokens` tightens the pipeline's own budget for this plan (never loosens
        it; a row over it runs alone rather than being refused)."""
        budget = self.max_batch_tokens
        if max_batch_tokens is not None:
            budget = max_batch_tokens if budget is None else min(budget, max_batch_tokens)
        return plan_batches(self.tower, rows, items, batch_size, self.limits, budget)

    def over_limit(self, row: Any, index: int) -> EngineLimitError | None:
        """The error of a row the engine cannot take (None when it fits)."""
        length, longest = self.tower.length(row), self.limits.max_length
        budget = self.max_batch_tokens
        if length is not None and budget is not None and length > budget:
            return EngineLimitError(
                index,
                f"{length} tokens exceed max_batch_tokens={budget}, the most one model run "
                "takes; send a shorter text or raise max_batch_tokens",
            )
        if length is None or longest is None or length <= longest:
            return None
        return EngineLimitError(
            index,
            f"{length} tokens exceed the longest text this engine takes ({longest}); send a "
            f"shorter text, lower max_length, or build the engine for longer texts",
        )

    def run_rows(
        self,
        rows: Sequence[Any],
        batch_size: int,
        options: FinishOptions,
        first_index: int = 0,
        progress: Callable[[int], object] | None = None,
    ) -> Embedded:
        """Embed every row that is not None; errors name `first_index + position`;
        `progress` is told each batch's size when it is done."""
        vectors = np.zeros((len(rows), options.truncate_dim or self.embed_dim), np.float32)
        errors: list[ClipEdgeError | None] = [None] * len(rows)
        runnable = []
        for position, row in enumerate(rows):
            if row is None:
                continue
            errors[position] = self.over_limit(row, first_index + position)
            if errors[position] is None:
                runnable.append(position)
        for batch in self.batches(rows, runnable, batch_size):
            for items, pooled in self._run(batch, rows, first_index, errors):
                vectors[items] = truncate_and_normalize(
                    pooled, options.truncate_dim, options.normalize
                )
            if progress is not None:
                progress(len(batch.items))
        return Embedded(vectors, errors)

    def embed(
        self,
        prepared: Prepared,
        batch_size: int,
        options: FinishOptions,
        first_index: int = 0,
        progress: Callable[[int], object] | None = None,
    ) -> Embedded:
        """Embed a tower's prepared items; preparation errors stay in their slots."""
        rows = [prepared.row(i) if e is None else None for i, e in enumerate(prepared.errors)]
        embedded = self.run_rows(rows, batch_size, options, first_index, progress)
        for position, error in enumerate(prepared.errors):
            if error is not None:
                embedded.errors[position] = error
        return embedded

    def _run(
        self,
        batch: TowerBatch,
        rows: Sequence[Any],
        first_index: int,
        errors: list[ClipEdgeError | None],
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """(items, pooled vectors) of a batch; a batch that fails runs again item by item,
        so an item's failure (or NaN) is its own."""
        try:
            output = self.session.run(batch.feeds)
            pooled = pool(output, self.tower.pooling, batch.feeds)
        except Exception as exc:
            if len(batch.items) > 1:
                name, count = self.tower.spec.name, len(batch.items)
                log.info("%s batch of %d failed (%s); retrying alone", name, count, exc)
                for item in batch.items:
                    single = TowerBatch(self.tower.feeds([rows[item]]), [item])
                    yield from self._run(single, rows, first_index, errors)
                return
            item = batch.items[0]
            errors[item] = self._engine_error(exc, first_index + item)
            return
        bad = set(nonfinite_rows(pooled))
        for row in bad:
            item = batch.items[row]
            errors[item] = NonFiniteEmbeddingError(self.tower.spec.name, [first_index + item])
        keep = [row for row in range(len(batch.items)) if row not in bad]
        if keep:
            yield [batch.items[row] for row in keep], pooled[keep]

    def _engine_error(self, exc: Exception, index: int) -> ClipEdgeError:
        if isinstance(exc, ClipEdgeError):
            return exc
        error = BackendError(
            f"the {self.tower.spec.name} engine failed: {type(exc).__name__}: {exc}", index
        )
        error.__cause__ = exc
        return error
