"""Check a saved graph in onnxruntime against the PyTorch tower it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from clipedge.postprocess import pool, truncate_and_normalize
from clipedge.towers import TEXT, VISION, tower_spec

from .config import ClipConfig
from .onnx_export import ExportedGraph

# fp32 graph vs fp32 eager: the same maths, differing only in kernel summation order.
MIN_COSINE = 0.99999
MAX_ABS_NORMALISED = 1e-4


@dataclass(frozen=True)
class Verification:
    tower: str
    max_abs: float
    max_abs_normalised: float
    min_cosine: float

    @property
    def ok(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.max_abs_normalised <= MAX_ABS_NORMALISED


def _text_inputs(cfg: ClipConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Texts of different lengths, padded."""
    lengths = [3, 17, 40]
    ids = np.full((len(lengths), max(lengths)), cfg.text.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(3, cfg.text.vocab_size, length)
        ids[row, 0], ids[row, length - 1] = 0, 2
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _vision_inputs(cfg: ClipConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random-pixel images."""
    size = cfg.vision.image_size
    return {"pixel_values": rng.standard_normal((2, 3, size, size)).astype(np.float32)}


INPUTS = {TEXT.name: _text_inputs, VISION.name: _vision_inputs}


def verification_inputs(tower: str, cfg: ClipConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for one tower."""
    return INPUTS[tower](cfg, np.random.default_rng(seed))


def _normalise(x: np.ndarray) -> np.ndarray:
    return truncate_and_normalize(x)


def verify_graph(
    module: torch.nn.Module, graph: ExportedGraph, cfg: ClipConfig, path: Path | None = None
) -> Verification:
    """The graph at `path` (default: `graph.path`) against the PyTorch tower."""
    inputs = verification_inputs(graph.tower, cfg)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    options = ort.SessionOptions()
    session = ort.InferenceSession(
        str(path or graph.path), options, providers=["CPUExecutionProvider"]
    )
    actual = session.run(None, inputs)[0]
    del session
    pooling = tower_spec(graph.tower).pooling
    expected, actual = pool(expected, pooling, inputs), pool(actual, pooling, inputs)
    cosine = (_normalise(expected) * _normalise(actual)).sum(-1)
    return Verification(
        tower=graph.tower,
        max_abs=float(np.abs(expected - actual).max()),
        max_abs_normalised=float(np.abs(_normalise(expected) - _normalise(actual)).max()),
        min_cosine=float(cosine.min()),
    )
