"""Calibration feeds: graph inputs as dicts, and the reader onnxruntime's quantisers take."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

Feed = dict[str, np.ndarray]


class RowFeedReader(CalibrationDataReader):
    """Calibration feeds one row at a time, readable in ranges.

    onnxruntime's calibrators record every calibrated tensor of one `get_next` (attention maps
    included) until it is folded into ranges or histograms, so whole batches took the
    full-size towers out of memory (docs/benchmarks.md). Rows never
    interact in these towers, so one-row feeds give the batches' ranges at a batch-size
    fraction of the memory, and `set_range` lets `quantize_static` fold them in one by one
    (`CalibStridedMinMax`).
    """

    def __init__(self, feeds: Iterable[Feed]) -> None:
        self.rows = [
            {name: value[i : i + 1] for name, value in feed.items()}
            for feed in feeds
            for i in range(len(next(iter(feed.values()))))
        ]
        self.set_range(0, len(self.rows))

    def get_next(self) -> Feed | None:
        return next(self._rows, None)

    def __len__(self) -> int:
        return len(self.rows)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._rows = iter(self.rows[start_index:end_index])
