"""Pooling, truncation and normalisation against the fixture's recorded tensors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from clipedge.postprocess import check_truncate_dim, cls_pool, mean_pool, truncate_and_normalize

EXPECTED = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny" / "expected"
MATRYOSHKA = (32, 64, 128, 256, 512, 768, 1024)


def load(name: str) -> np.ndarray:
    return np.load(EXPECTED / f"{name}.npy")


def test_mean_pool_of_reference_hidden_states_equals_reference_embeddings():
    hidden = load("debug_text_batch_last_hidden_state")
    input_ids = load("text_batch_input_ids")
    order = load("text_batch_order")
    pooled = mean_pool(hidden, (input_ids != 1).astype(np.int64))
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, load("text_default_raw")[order], rtol=0, atol=2e-6)


def test_mean_pool_ignores_padding():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, 5, 8)).astype(np.float32)
    padded = np.concatenate([hidden, rng.standard_normal((1, 4, 8)).astype(np.float32)], axis=1)
    mask = np.array([[1] * 5 + [0] * 4], dtype=np.int64)
    np.testing.assert_allclose(
        mean_pool(padded, mask), mean_pool(hidden, np.ones((1, 5), np.int64)), atol=1e-6
    )
    # a float32 matmul against numpy's mean: rounding differs by a few ulp with the BLAS
    np.testing.assert_allclose(
        mean_pool(hidden, np.ones((1, 5), np.int64)), hidden.mean(axis=1), rtol=1e-6
    )


def test_mean_pool_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected hidden states"):
        mean_pool(np.zeros((2, 3, 4), np.float32), np.ones((2, 4), np.int64))


def test_cls_pool_takes_first_token():
    tokens = load("debug_image_all_tokens")
    pooled = cls_pool(tokens)
    assert pooled.flags.c_contiguous and pooled.dtype == np.float32
    np.testing.assert_array_equal(pooled, tokens[:, 0, :])


@pytest.mark.parametrize(
    ("raw", "expected", "truncate_dim"),
    [
        ("text_default_raw", "text_default_norm", None),
        ("text_default_raw", "text_default_trunc32", 32),
        ("text_query_raw", "text_query_norm", None),
        ("image_raw", "image_norm", None),
        ("image_raw", "image_trunc32", 32),
    ],
)
def test_truncate_then_normalize_equals_reference(raw, expected, truncate_dim):
    out = truncate_and_normalize(load(raw), truncate_dim)
    np.testing.assert_allclose(out, load(expected), rtol=0, atol=1e-6)


def test_truncate_slices_before_normalizing():
    raw = load("text_default_raw")
    out = truncate_and_normalize(raw, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    full_then_sliced = truncate_and_normalize(raw)[:, :32]
    assert not np.allclose(out, full_then_sliced)


def test_without_normalize_returns_float32_slice_copy():
    raw = load("image_raw")
    out = truncate_and_normalize(raw, 16, normalize=False)
    np.testing.assert_array_equal(out, raw[:, :16])
    out[0, 0] += 1.0
    assert raw[0, 0] != out[0, 0]


def test_zero_vector_stays_finite():
    out = truncate_and_normalize(np.zeros((2, 4), np.float32))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("truncate_dim", [0, -3, 65, 2.0, "32", True])
def test_invalid_truncate_dim(truncate_dim):
    with pytest.raises(ValueError, match="truncate_dim"):
        check_truncate_dim(truncate_dim, 64)


def test_untrained_truncate_dim_warns():
    raw = load("image_raw")
    with pytest.warns(UserWarning, match="Matryoshka"):
        check_truncate_dim(48, raw.shape[1], MATRYOSHKA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_truncate_dim(32, raw.shape[1], MATRYOSHKA)
        check_truncate_dim(48, raw.shape[1])
