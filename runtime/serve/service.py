"""The embedding service without HTTP: the model, one batcher per tower, one request's way.

A request's items are prepared (`prepare.py`: per-item errors become a 4xx naming the
request's item), queued on the towers' batchers, which run them through the model's
`Pipeline`, then truncated, normalised and encoded, all under the request's one deadline.
FastAPI lives in `app.py` only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import numpy as np

import clipedge
from clipedge.errors import ClipEdgeError
from clipedge.postprocess import truncate_and_normalize
from clipedge.towers import TEXT, VISION

from .batcher import QueueFull, TowerBatcher
from .encodings import response_body
from .errors import ApiError, api_error
from .metrics import Metrics
from .prepare import Preparer
from .requests import EmbeddingRequest
from .settings import ServeSettings

log = logging.getLogger("clipedge.serve")


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
        self.active = 0  # embedding requests being served (--max-concurrency)

    @functools.cached_property
    def preparer(self) -> Preparer:
        return Preparer(self.settings, self.model)

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
                s.max_batch_seconds or None,
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
        if "preparer" in self.__dict__:
            self.preparer.close()

    # ----- one request -----------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, deadline: float) -> dict[str, Any]:
        """Prepare, queue and wait under one deadline (504 when it passes). However the wait
        ends (the deadline, or the client gone and this coroutine cancelled), the request's
        preparation stops and its queued items are dropped: the batcher skips them."""
        futures: list = []
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                rows, usage = await self.preparer.prepare(request, deadline)
                futures = self._submit(rows)
                waits = (asyncio.wrap_future(f) for f in futures)
                results = await asyncio.gather(*waits, return_exceptions=True)
        except TimeoutError:
            raise ApiError(
                504,
                f"the request took longer than {self.settings.request_timeout} s",
                code="timeout",
            ) from None
        finally:
            for future in futures:
                future.cancel()  # a no-op for the items that ran
        for index, result in enumerate(results):
            if isinstance(result, ClipEdgeError):
                raise api_error(result, index)
            if isinstance(result, BaseException):
                raise result
        vectors = np.stack(results)
        vectors = truncate_and_normalize(vectors, request.dimensions, request.normalized)
        body = response_body(self.settings.model_name, request, vectors, usage)
        trained = self.model.manifest.matryoshka_dimensions
        if request.dimensions is not None and trained and request.dimensions not in trained:
            body["warnings"] = [
                f"dimensions={request.dimensions} is not one of the trained Matryoshka "
                f"dimensions {sorted(trained)}; retrieval quality may suffer"
            ]
        return body

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
