"""Keep one piece of onnxruntime's advice out of the user's calibration log.

onnxruntime's quantisers log "Please consider to run pre-processing before quantization" on
the root logger for every graph not passed through `quant_pre_process` (shape inference and
graph optimisation). The converters deliberately skip it: the optimiser may fuse and rename
nodes, and the block search and the accuracy report find nodes by their exported names. So
that advice, and nothing else, is dropped while a quantiser runs (a `with` block, or a
decorator on the converter).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


def _not_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Please consider")


@contextlib.contextmanager
def without_preprocessing_advice() -> Iterator[None]:
    root = logging.getLogger()
    root.addFilter(_not_preprocessing_advice)
    try:
        yield
    finally:
        root.removeFilter(_not_preprocessing_advice)
