"""The engine contract: what every backend's session for one tower's graph offers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EngineLimits:
    """The largest batch and text an opened engine takes (None: no limit). The pipeline
    splits batches above `max_batch` and refuses, per item, texts longer than `max_length`
    (an input error of that item, never a failed batch)."""

    max_batch: int | None = None
    max_length: int | None = None

    def batch_size(self, requested: int) -> int:
        return requested if self.max_batch is None else min(requested, self.max_batch)


NO_LIMITS = EngineLimits()


class TowerSession(Protocol):
    """A loaded graph: `run(feeds)` returns the graph's first output and is safe to call from
    many threads; `limits` says what it takes; `provider` what actually runs it (for logs and
    tests); `close` frees it."""

    provider: str
    limits: EngineLimits

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None: ...
