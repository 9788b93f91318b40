"""The embedding service without HTTP: the model, one batcher per tower, one request's way.

A request's items are prepared by their towers (per-item errors become a 4xx naming the
request's item), queued on the towers' batchers, which run them through the model's
`Pipeline`, then truncated, normalised and encoded. FastAPI lives in `app.py` only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

import clipedge
from clipedge.errors import ClipEdgeError
from clipedge.postprocess import truncate_and_normalize
from clipedge.towers import TEXT, VISION

from .batcher import QueueFull, TowerBatcher
from .encodings import response_body
from .errors import ApiError, api_error
from .metrics import Metrics
from .requests import IMAGE, TEXT_ITEM, TOKENS, EmbeddingRequest
from .settings import ServeSettings

log = logging.getLogger("clipedge.serve")
# Usage as the hosted API prices images: per 512x512 tile of the image, partial tiles count.
TOKENS_PER_TILE = 4000
TILE = 512
# Requests whose texts are this short are prepared on the event loop (microseconds).
INLINE_CHARS = 4096


def open_model(settings: ServeSettings) -> clipedge.ClipEdgeModel:
    """The service's model: manifest, plan and towers; sessions open on first use, so this
    is quick and `clipedge serve` calls it before listening, to fail fast on a bad bundle."""
    return clipedge.load(
        settings.bundle,
        backend=settings.backend,
        precision=settings.precision,
        options=settings.options,
    )


class Service:
    """The loaded model and one batcher per tower; `ready` once a warm-up has run."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics,
        opened: clipedge.ClipEdgeModel | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.opened = opened
        self.model: clipedge.ClipEdgeModel | None = None
        self.batchers: dict[str, TowerBatcher] = {}
        self.ready = False
        self.failed: str | None = None

    def start(self) -> None:
        """Load (unless opened already), start the batchers and warm every tower up, which
        opens the sessions (blocking; run in a thread)."""
        s = self.settings
        model = self.opened or open_model(s)
        warm_up = {TEXT.name: "warm-up", VISION.name: np.zeros((64, 64, 3), np.uint8)}
        for name, tower in model.towers.items():
            batcher = TowerBatcher(
                model.pipeline(name),
                s.max_batch_size,
                s.max_wait_ms / 1000,
                s.max_queue,
                self.metrics.observe_batch,
            )
            self.batchers[name] = batcher
            self.metrics.queue_depth.labels(name).set_function(lambda b=batcher: b.depth)
            batcher.submit([tower.prepare([warm_up[name]]).row(0)])[0].result()
        self.model = model
        self.ready = True
        log.info("ready: %s, %s", model.plan.backend, model.precisions)

    def healthy(self) -> bool:
        stall_after = max(30.0, 3 * self.settings.request_timeout)
        return self.ready and not any(b.stalled(stall_after) for b in self.batchers.values())

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    # ----- one request -----------------------------------------------------------------

    def _tower(self, name: str, what: str):
        if name not in self.batchers:
            raise ApiError(
                400, f"this server's bundle has no {name} tower: it cannot embed {what}", "input"
            )
        return self.model.tower(name)

    def prepare(self, request: EmbeddingRequest) -> tuple[list[tuple[str, Any]], int]:
        """Each item's (tower, row) and the usage tokens; 4xx naming a bad item."""
        rows: list[tuple[str, Any] | None] = [None] * len(request.items)
        usage = 0
        texts = [i for i, item in enumerate(request.items) if item.kind == TEXT_ITEM]
        images = [i for i, item in enumerate(request.items) if item.kind == IMAGE]
        if texts:
            tower = self._tower(TEXT.name, "texts")
            values = [request.items[i].value for i in texts]
            prepared = tower.prepare(values, task=request.task)
            for position, index in enumerate(texts):
                if (error := prepared.errors[position]) is not None:
                    raise api_error(error, index)
                if prepared.truncated[position] and not request.truncate:
                    raise ApiError(
                        400,
                        f"item {index}: longer than max_length={tower.default_max_length} "
                        "tokens; send truncate: true to embed its beginning",
                        "input",
                    )
                rows[index] = (TEXT.name, prepared.row(position))
                usage += len(prepared.row(position))
        if images:
            tower = self._tower(VISION.name, "images")
            prepared = tower.prepare([request.items[i].value for i in images])
            for position, index in enumerate(images):
                if (error := prepared.errors[position]) is not None:
                    raise api_error(error, index)
                width, height = prepared.sizes[position]
                usage += TOKENS_PER_TILE * math.ceil(width / TILE) * math.ceil(height / TILE)
                rows[index] = (VISION.name, prepared.row(position))
        for index, item in enumerate(request.items):
            if item.kind == TOKENS:
                ids = self._tokens(item.value, index, request)
                rows[index] = (TEXT.name, ids)
                usage += len(ids)
        return rows, usage  # type: ignore[return-value]

    def _tokens(self, ids: list[int], index: int, request: EmbeddingRequest) -> list[int]:
        tower = self._tower(TEXT.name, "token ids")
        vocab = tower.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(
                400,
                f"item {index}: token ids must be in [0, {vocab}) for this model's tokenizer",
                "input",
            )
        limit = tower.default_max_length
        if len(ids) > limit and not request.truncate:
            raise ApiError(400, f"item {index}: {len(ids)} tokens exceed max_length={limit}")
        return ids[:limit]

    async def embed(self, request: EmbeddingRequest, deadline: float) -> dict[str, Any]:
        texts = sum(len(item.value) for item in request.items if item.kind == TEXT_ITEM)
        if texts < INLINE_CHARS and all(item.kind != IMAGE for item in request.items):
            rows, usage = self.prepare(request)  # microseconds: no thread hop
        else:  # tokenising long texts, fetching and decoding images: off the event loop
            rows, usage = await run_in_threadpool(self.prepare, request)
        futures = self._submit(rows)
        waits = [asyncio.wrap_future(f) for f in futures]
        try:
            await asyncio.wait_for(
                asyncio.gather(*waits, return_exceptions=True),
                max(0.0, deadline - time.monotonic()),
            )
        except TimeoutError:
            for future in futures:
                future.cancel()
            raise ApiError(
                504,
                f"the request took longer than {self.settings.request_timeout} s",
                code="timeout",
            ) from None
        for index, future in enumerate(futures):
            if (error := future.exception()) is not None:
                if isinstance(error, ClipEdgeError):
                    raise api_error(error, index)
                raise error
        vectors = np.stack([future.result() for future in futures])
        vectors = truncate_and_normalize(vectors, request.dimensions, request.normalized)
        return response_body(self.settings.model_name, request, vectors, usage)

    def _submit(self, rows: list[tuple[str, Any]]) -> list:
        """Queue every item on its tower's batcher: one future per item, in request order."""
        by_tower: dict[str, list[int]] = {}
        for index, (tower, _) in enumerate(rows):
            by_tower.setdefault(tower, []).append(index)
        futures: list = [None] * len(rows)
        try:
            for tower, indices in by_tower.items():
                queued = self.batchers[tower].submit([rows[i][1] for i in indices])
                for index, future in zip(indices, queued, strict=True):
                    futures[index] = future
        except QueueFull as exc:
            for future in futures:
                if future is not None:
                    future.cancel()
            raise ApiError(
                429, f"{exc}; retry shortly", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        return futures
