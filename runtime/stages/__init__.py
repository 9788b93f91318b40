"""A request's way through the model as named stages with plain data between them.

`prepare` (validate, tokenise or decode and preprocess, per item, with per-item errors) ->
`batch` (padded tower inputs from prepared items, possibly of many requests) -> `run` (one
batch through the tower's session) -> `finish` (pool as the manifest says, check, truncate,
normalise). `ClipEdgeModel.encode_text` / `encode_image` are compositions of these; a server
or a batch tool composes them differently (batching across requests, one error row per item).
"""

from .batch import TowerBatch, image_batches, image_feeds, text_batches, text_feeds
from .finish import FinishOptions, NonFiniteEmbeddingError, finish
from .prepare import ImagePreparer, PreparedImages, PreparedTexts, TextPreparer

__all__ = [
    "FinishOptions",
    "ImagePreparer",
    "NonFiniteEmbeddingError",
    "PreparedImages",
    "PreparedTexts",
    "TextPreparer",
    "TowerBatch",
    "finish",
    "image_batches",
    "image_feeds",
    "text_batches",
    "text_feeds",
]
