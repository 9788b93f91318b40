"""The one interface every backend implements for one tower's graph."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TowerSession(Protocol):
    """A loaded graph: `run(feeds)` returns the graph's first output; safe to call from many
    threads. `provider` says what actually runs it (for logs and tests)."""

    provider: str

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...
