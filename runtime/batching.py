"""Grouping of inputs into batches of similar length.

Padding every item of a batch to its longest member wastes compute on pad tokens; sorting by
length first (longest first, as the official `encode_text` does with character lengths) keeps
that waste small. Callers scatter the per-batch results back with the returned indices.
"""

from __future__ import annotations

from collections.abc import Sequence


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the inputs, longest first (ties in input order), cut into batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
