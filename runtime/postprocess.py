"""Pooling, Matryoshka truncation and L2 normalisation of tower outputs, as the official code does.

Text embeddings are the masked mean of the last hidden state (including `<s>` and `</s>`);
image embeddings are the CLS token. Truncation to `truncate_dim` happens before normalising,
so a truncated embedding is unit-length again.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np

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


def check_truncate_dim(
    truncate_dim: int | None, embed_dim: int, trained_dims: Collection[int] = ()
) -> None:
    """Reject dims outside 1..embed_dim; warn about dims the model was not trained to use."""
    if truncate_dim is None:
        return
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int):
        raise ValueError(f"truncate_dim must be an int, got {type(truncate_dim).__name__}")
    if not 1 <= truncate_dim <= embed_dim:
        raise ValueError(f"truncate_dim must be in [1, {embed_dim}], got {truncate_dim}")
    if trained_dims and truncate_dim not in trained_dims:
        warnings.warn(
            f"truncate_dim={truncate_dim} is not one of the trained Matryoshka dimensions "
            f"{sorted(trained_dims)}; retrieval quality may suffer",
            stacklevel=3,
        )


def truncate_and_normalize(
    embeddings: np.ndarray,
    truncate_dim: int | None = None,
    normalize: bool = True,
    trained_dims: Collection[int] = (),
) -> np.ndarray:
    """Keep the first `truncate_dim` dimensions, then L2-normalise each row (float32 [B, k])."""
    if embeddings.ndim != 2:
        raise ValueError(f"expected embeddings [B, D], got {embeddings.shape}")
    check_truncate_dim(truncate_dim, embeddings.shape[1], trained_dims)
    out = np.array(embeddings[:, :truncate_dim], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, NORM_EPS)
    return out
