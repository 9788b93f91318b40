"""Padded tower inputs from prepared items, and which items each batch row belongs to.

Texts are grouped by token count (longest first, as the official `encode_text` sorts) so a
batch pads little; the feed builders also take rows gathered from many requests, which is how
a server batches across requests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .prepare import PreparedImages, PreparedTexts


@dataclass
class TowerBatch:
    """Graph inputs for one run, and for each row the item it belongs to."""

    feeds: dict[str, np.ndarray]
    items: list[int]


def check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def text_feeds(rows: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, np.ndarray]:
    """`input_ids` right-padded to the longest row and `attention_mask`, int64 [B, L].

    The mask is `input_ids != pad_token_id`, which is what the official model computes from
    the ids (it ignores the tokenizer's own mask).
    """
    width = max((len(ids) for ids in rows), default=0)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    for row, ids in zip(input_ids, rows, strict=True):
        row[: len(ids)] = ids
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_token_id).astype(np.int64)}


def image_feeds(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """`pixel_values` float32 [B, 3, S, S]."""
    return {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)}


def length_sorted(lengths: Sequence[int], items: Sequence[int], batch_size: int) -> list[list[int]]:
    """`items` longest first (ties in input order), cut into batches."""
    order = sorted(items, key=lambda item: -lengths[item])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def text_batches(
    prepared: PreparedTexts, batch_size: int, pad_token_id: int
) -> Iterator[TowerBatch]:
    """Batches of the valid texts, grouped by length."""
    valid = [i for i, ids in enumerate(prepared.token_ids) if ids is not None]
    for items in length_sorted(prepared.token_counts, valid, check_batch_size(batch_size)):
        rows = [prepared.token_ids[i] for i in items]
        yield TowerBatch(text_feeds(rows, pad_token_id), items)  # type: ignore[arg-type]


def image_batches(
    prepared: PreparedImages, batch_size: int, offset: int = 0
) -> Iterator[TowerBatch]:
    """Batches of the valid images in input order (no copy when none failed); rows name
    items as `offset + position`, the caller's index when `prepared` is a chunk."""
    valid = [i for i, error in enumerate(prepared.errors) if error is None]
    batch_size = check_batch_size(batch_size)
    for start in range(0, len(valid), batch_size):
        items = valid[start : start + batch_size]
        contiguous = items == list(range(items[0], items[-1] + 1))
        pixels = prepared.pixels[items[0] : items[-1] + 1] if contiguous else prepared.pixels[items]
        yield TowerBatch(image_feeds(pixels), [offset + item for item in items])
