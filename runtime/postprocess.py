"""Pooling, Matryoshka truncation and L2 normalisation of tower outputs, as the official code does.

Text embeddings are the masked mean of the last hidden state (including `<s>` and `</s>`);
image embeddings are the CLS token. Which one a tower uses is the manifest's `pooling` field.
Truncation to `truncate_dim` happens before normalising, so a truncated embedding is unit-length
again. This module is the only place these operations exist: export verification, calibration
and the runtime all call it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from .errors import OptionError
from .user_warnings import warn

# torch.nn.functional.normalize's default eps: a zero vector stays zero instead of becoming NaN.
NORM_EPS = 1e-12


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean over the unmasked tokens: [B, L, D] and [B, L] -> float32 [B, D]."""
    if last_hidden_state.ndim != 3 or attention_mask.shape != last_hidden_state.shape[:2]:
        raise ValueError(
            f"expected hidden states [B, L, D] and mask [B, L], got "
            f"{last_hidden_state.shape} and {attention_mask.shape}"
        )
    hidden = last_hidden_state.astype(np.float32, copy=False)
    mask = attention_mask.astype(np.float32)
    summed = np.matmul(mask[:, None, :], hidden)[:, 0, :]
    return summed / mask.sum(axis=1, keepdims=True)


def cls_pool(last_hidden_state: np.ndarray) -> np.ndarray:
    """First token of every sequence: [B, T, D] -> float32 [B, D]."""
    if last_hidden_state.ndim != 3:
        raise ValueError(f"expected [B, T, D], got {last_hidden_state.shape}")
    return np.ascontiguousarray(last_hidden_state[:, 0, :], dtype=np.float32)


POOLING = ("mean", "cls")


def pool(output: np.ndarray, pooling: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """One float32 vector per row: graphs that pool inside return [B, D] as it is; token
    states [B, T, D] are pooled as the manifest says (`mean` over `attention_mask`, or `cls`)."""
    if output.ndim == 2:
        return output.astype(np.float32, copy=False)
    if pooling == "mean":
        return mean_pool(output, feeds["attention_mask"])
    if pooling == "cls":
        return cls_pool(output)
    raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLING)}")


def nonfinite_rows(embeddings: np.ndarray) -> list[int]:
    """Rows holding NaN or Inf (a corrupt graph or an overflow, never a valid embedding)."""
    return np.flatnonzero(~np.isfinite(embeddings).all(axis=1)).tolist()


def check_truncate_dim(
    truncate_dim: Any,
    embed_dim: int,
    trained_dims: Collection[int] = (),
    option: str = "truncate_dim",
) -> int | None:
    """The dimension to keep (NumPy integers accepted), or None for all of them.

    Dims outside 1..embed_dim are refused; dims the model was not trained to use warn.
    `option` is the name the caller knows the setting by (the batch tool's `dimensions`).
    """
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int | np.integer):
        raise OptionError(f"{option} must be an int, got {type(truncate_dim).__name__}")
    truncate_dim = int(truncate_dim)
    if not 1 <= truncate_dim <= embed_dim:
        raise OptionError(f"{option} must be in [1, {embed_dim}], got {truncate_dim}")
    if trained_dims and truncate_dim not in trained_dims:
        warn(
            f"{option}={truncate_dim} is not one of the trained Matryoshka dimensions "
            f"{sorted(trained_dims)}; retrieval quality may suffer"
        )
    return truncate_dim


def truncate_and_normalize(
    embeddings: np.ndarray, truncate_dim: int | None = None, normalize: bool = True
) -> np.ndarray:
    """Keep the first `truncate_dim` dimensions, then L2-normalise each row (float32 [B, k]).

    `truncate_dim` must have been checked with `check_truncate_dim`.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"expected embeddings [B, D], got {embeddings.shape}")
    out = np.array(embeddings[:, :truncate_dim], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, NORM_EPS)
    return out
