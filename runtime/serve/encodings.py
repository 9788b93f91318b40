"""Output encodings of an embedding: float, base64 float32, and packed sign bits.

`ubinary` and `binary` follow sentence-transformers' `quantize_embeddings`: the sign bits
(`v > 0`) packed eight to a byte, as uint8, and the same bytes minus 128 as int8.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

ENCODINGS = ("float", "base64", "binary", "ubinary")


def encode(vector: np.ndarray, encoding: str) -> Any:
    """One float32 vector in the requested encoding, JSON-ready."""
    if encoding == "float":
        return vector.astype(np.float32).tolist()
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    packed = np.packbits(vector > 0)
    if encoding == "ubinary":
        return packed.tolist()
    if encoding == "binary":
        return (packed.astype(np.int16) - 128).astype(np.int8).tolist()
    raise ValueError(f"unknown encoding {encoding!r}; choose from {ENCODINGS}")


def response_body(model_name: str, request: Any, vectors: np.ndarray, usage: int) -> dict:
    """The embeddings response both APIs read: one entry per item, in request order, in the
    encoding(s) asked for (an object keyed by encoding when several were)."""
    data = []
    for index, vector in enumerate(vectors):
        encoded = {name: encode(vector, name) for name in request.encodings}
        embedding = encoded if request.keyed else encoded[request.encodings[0]]
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "model": model_name,
        "object": "list",
        "data": data,
        "usage": {"total_tokens": usage, "prompt_tokens": usage},
    }
