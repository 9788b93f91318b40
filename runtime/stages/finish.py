"""The finish stage: a tower's raw output -> checked, truncated, normalised embeddings."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..postprocess import check_truncate_dim, nonfinite_rows, pool, truncate_and_normalize
from .batch import TowerBatch


class NonFiniteEmbeddingError(RuntimeError):
    """A tower returned NaN or Inf for some items: a corrupt graph, never a valid embedding."""

    def __init__(self, tower: str, items: list[int]) -> None:
        super().__init__(
            f"item {items[0]}{f' (and {len(items) - 1} more)' if len(items) > 1 else ''}: the "
            f"{tower} tower returned NaN/Inf; the bundle may be corrupt: load it with "
            "verify_checksums=True to check its files, or export it again"
        )
        self.tower = tower
        self.items = items


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


def finish(
    tower: str, pooling: str, batch: TowerBatch, output: np.ndarray, options: FinishOptions
) -> np.ndarray:
    """Pool as the manifest says, refuse non-finite rows (naming the items), truncate and
    normalise: float32 [B, k] in the batch's row order."""
    pooled = pool(output, pooling, batch.feeds)
    bad = nonfinite_rows(pooled)
    if bad:
        raise NonFiniteEmbeddingError(tower, [batch.items[row] for row in bad])
    return truncate_and_normalize(pooled, options.truncate_dim, options.normalize)
