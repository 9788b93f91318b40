"""One request's items made ready for the batchers, cheapest checks first, fairly.

Token ids (checks only), then texts, tokenised lazily in chunks (each text cut to a character
budget first, `clipedge.inputs.text`) so the first text over `max_length` (without
`truncate`), `max_batch_tokens` or `--max-request-tokens` stops the request, then images.
URLs are fetched on their own pool, `--fetch-per-request` at once and never past the
request's deadline, so stalled URLs hold only their own request; tokenising and decoding
share a second pool, half of which one request may hold. Cancelling `prepare` (the deadline)
drops what has not started.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clipedge.inputs.fetch import fetch_url
from clipedge.towers import TEXT, VISION

from .errors import ApiError, api_error
from .requests import IMAGE, TEXT_ITEM, TOKENS, EmbeddingRequest
from .settings import ServeSettings

# Usage as the hosted API prices images: 4000 per started 512x512 tile of the image.
TOKENS_PER_TILE, TILE = 4000, 512
# Texts this short in all are tokenised on the event loop (microseconds).
INLINE_CHARS = 4096
# Texts per tokenising chunk: at most this many characters (after the cut) or items.
CHUNK_CHARS, CHUNK_ITEMS = 65_536, 64


class Preparer:
    """The two pools and the checks; `prepare` is a request's (tower, row) list and usage."""

    def __init__(self, settings: ServeSettings, model: Any) -> None:
        self.settings = settings
        self.model = model
        workers = settings.prepare_workers or os.cpu_count() or 1
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_workers, "clipedge-fetch")
        self.work_pool = ThreadPoolExecutor(workers, "clipedge-prepare")
        self.work_share = max(1, workers // 2)

    def close(self) -> None:
        for pool in (self.fetch_pool, self.work_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    def tower(self, name: str, what: str) -> Any:
        if name not in self.model.towers:
            raise ApiError(
                400, f"this server's bundle has no {name} tower: it cannot embed {what}", "input"
            )
        return self.model.tower(name)

    async def prepare(self, request: EmbeddingRequest, deadline: float) -> tuple[list, int]:
        rows: list[Any] = [None] * len(request.items)
        budget = Budget(self.settings)
        for index, item in enumerate(request.items):
            if item.kind == TOKENS:
                rows[index] = (TEXT.name, self._tokens(item.value, index, request, budget))
        texts = [i for i, item in enumerate(request.items) if item.kind == TEXT_ITEM]
        if texts:
            await self._texts(request, texts, rows, budget)
        images = [i for i, item in enumerate(request.items) if item.kind == IMAGE]
        if images:
            tower = self.tower(VISION.name, "images")
            share = (
                asyncio.Semaphore(self.settings.fetch_per_request),
                asyncio.Semaphore(self.work_share),
            )
            tasks = [self._image(tower, request.items[i].value, i, deadline, share) for i in images]
            for index, (row, size) in zip(images, await first_failure(tasks), strict=True):
                rows[index] = (VISION.name, row)
                budget.usage += (
                    TOKENS_PER_TILE * math.ceil(size[0] / TILE) * math.ceil(size[1] / TILE)
                )
        return rows, budget.usage

    def _tokens(self, ids: list[int], index: int, request: Any, budget: Budget) -> list[int]:
        tower = self.tower(TEXT.name, "token ids")
        vocab = tower.tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(
                400,
                f"item {index}: token ids must be in [0, {vocab}) for this model's tokenizer",
                "input",
            )
        limit = tower.default_max_length
        if len(ids) > limit and not request.truncate:
            raise ApiError(
                400, f"item {index}: {len(ids)} tokens exceed max_length={limit}", "input"
            )
        ids = ids[:limit]
        budget.add(len(ids), index)
        return ids

    async def _texts(self, request: Any, texts: list[int], rows: list, budget: Budget) -> None:
        tower = self.tower(TEXT.name, "texts")
        cut = tower.tokenizer.longest_token_chars * (tower.default_max_length + 32)
        lengths = [min(len(request.items[i].value), cut) for i in texts]
        inline = sum(lengths) < INLINE_CHARS
        loop = asyncio.get_running_loop()
        for chunk in text_chunks(texts, lengths):
            values = [request.items[i].value for i in chunk]
            if inline:
                prepared = tower.prepare(values, task=request.task)
            else:
                prepared = await loop.run_in_executor(
                    self.work_pool, lambda v=values: tower.prepare(v, task=request.task)
                )
            for position, index in enumerate(chunk):
                if (error := prepared.errors[position]) is not None:
                    raise api_error(error, index)
                if prepared.truncated[position] and not request.truncate:
                    raise ApiError(
                        400,
                        f"item {index}: longer than max_length={tower.default_max_length} "
                        "tokens; send truncate: true to embed its beginning",
                        "input",
                    )
                ids = prepared.row(position)
                budget.add(len(ids), index)
                rows[index] = (TEXT.name, ids)

    async def _image(
        self, tower: Any, value: Any, index: int, deadline: float, share: tuple
    ) -> tuple:
        loop = asyncio.get_running_loop()
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            policy = self.model.options.url_policy
            async with share[0]:
                # Never past the request's deadline (the request's 504 comes first anyway).
                remaining = max(0.01, min(policy.timeout, deadline - time.monotonic()))
                policy = dataclasses.replace(policy, timeout=remaining)
                value = await loop.run_in_executor(self.fetch_pool, fetch_url, value, index, policy)
        async with share[1]:
            prepared = await loop.run_in_executor(
                self.work_pool, lambda: tower.prepare([value], index, parallel=False)
            )
        if (error := prepared.errors[0]) is not None:
            raise api_error(error, index)
        return prepared.row(0), prepared.sizes[0]


class Budget:
    """The request's text tokens against `--max-batch-tokens` (one item) and
    `--max-request-tokens` (all of them); both 413 naming the item."""

    def __init__(self, settings: ServeSettings) -> None:
        self.per_item = settings.options.max_batch_tokens
        self.per_request = settings.max_request_tokens
        self.usage = 0

    def add(self, tokens: int, index: int) -> None:
        if tokens > self.per_item:
            raise ApiError(
                413,
                f"item {index}: {tokens} tokens exceed max_batch_tokens={self.per_item}, the "
                "most one model run takes; send a shorter text",
                "input",
            )
        self.usage += tokens
        if self.usage > self.per_request:
            raise ApiError(
                413,
                f"item {index}: the request's texts exceed max_request_tokens="
                f"{self.per_request}; split the request",
                "input",
            )


def text_chunks(items: list[int], lengths: list[int]) -> Any:
    """`items` in order, in chunks of at most CHUNK_ITEMS and (past one item) CHUNK_CHARS."""
    chunk: list[int] = []
    size = 0
    for item, length in zip(items, lengths, strict=True):
        if chunk and (len(chunk) >= CHUNK_ITEMS or size + length > CHUNK_CHARS):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += length
    if chunk:
        yield chunk


async def first_failure(coroutines: list) -> list:
    """Every coroutine's result in order; the first to fail cancels the others and raises."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
