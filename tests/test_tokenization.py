"""Tokenisation equals the official tokenizer call recorded in the fixture."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from clipedge.batching import length_sorted_batches
from clipedge.inputs.text import TextTokenizer, apply_instruction

FIXTURE = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny"
PAD_ID = 1


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURE / "expected" / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(FIXTURE / "checkpoint" / "tokenizer.json", pad_token_id=PAD_ID)


def padded(rows: list[list[int]]) -> np.ndarray:
    width = max(len(row) for row in rows)
    return np.array([row + [PAD_ID] * (width - len(row)) for row in rows], dtype=np.int64)


@pytest.mark.parametrize(
    ("key", "max_length", "instruction"),
    [
        ("token_ids_default", 512, None),
        ("token_ids_max_length_16", 16, None),
        ("token_ids_retrieval_query", 512, "retrieval_query_instruction"),
    ],
)
def test_ids_equal_fixture(tokenizer, manifest, key, max_length, instruction):
    texts = manifest["texts"]
    if instruction is not None:
        texts = apply_instruction(texts, manifest[instruction])
    input_ids, attention_mask = tokenizer.encode(texts, max_length)
    expected = padded(manifest[key])
    assert input_ids.dtype == np.int64 and attention_mask.dtype == np.int64
    np.testing.assert_array_equal(input_ids, expected)
    lengths = [len(row) for row in manifest[key]]
    np.testing.assert_array_equal(attention_mask.sum(axis=1), lengths)


def test_batch_ids_equal_fixture_batch(tokenizer, manifest):
    order = np.load(FIXTURE / "expected" / "text_batch_order.npy")
    input_ids, _ = tokenizer.encode([manifest["texts"][i] for i in order], 512)
    expected = np.load(FIXTURE / "expected" / "text_batch_input_ids.npy")
    np.testing.assert_array_equal(input_ids, expected)


def test_truncation_keeps_closing_token_for_every_length(tokenizer, manifest):
    long_text = manifest["texts"][6]
    full = tokenizer.encode([long_text], 8192)[0][0].tolist()
    for max_length in (3, 4, 17, 100):
        ids = tokenizer.encode([long_text], max_length)[0][0].tolist()
        assert ids == full[: max_length - 1] + [full[-1]]


def test_single_items_match_batched_rows(tokenizer, manifest):
    batch, mask = tokenizer.encode(manifest["texts"], 512)
    for row, text in enumerate(manifest["texts"]):
        single, _ = tokenizer.encode([text], 512)
        width = single.shape[1]
        np.testing.assert_array_equal(batch[row, :width], single[0])
        assert not mask[row, width:].any()


def test_concurrent_calls_with_different_lengths(tokenizer, manifest):
    texts = manifest["texts"]
    expected = {n: tokenizer.encode(texts, n)[0] for n in (8, 16, 512)}
    failures: list[int] = []

    def work(max_length: int) -> None:
        for _ in range(20):
            if not np.array_equal(tokenizer.encode(texts, max_length)[0], expected[max_length]):
                failures.append(max_length)

    threads = [threading.Thread(target=work, args=(n,)) for n in (8, 16, 512) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_literal_pad_token_is_masked_like_the_model_does(tokenizer):
    input_ids, attention_mask = tokenizer.encode(["a <pad> b"], 512)
    np.testing.assert_array_equal(attention_mask, (input_ids != PAD_ID).astype(np.int64))
    assert attention_mask.sum() < input_ids.shape[1]


def test_empty_batch(tokenizer):
    input_ids, attention_mask = tokenizer.encode([], 512)
    assert input_ids.shape == attention_mask.shape == (0, 0)


@pytest.mark.parametrize("max_length", [2, 0, -1, 8193, 16.0, "16", True, None])
def test_invalid_max_length(tokenizer, max_length):
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode(["a"], max_length)


@pytest.mark.parametrize(("bad", "type_name"), [(None, "NoneType"), (3, "int"), (b"x", "bytes")])
def test_non_string_item_names_index(tokenizer, bad, type_name):
    texts = ["a", "b", "c", bad]
    with pytest.raises(TypeError, match=f"item 3: expected str, got {type_name}"):
        tokenizer.encode(texts, 512)
    with pytest.raises(TypeError, match="item 3"):
        apply_instruction(texts, "Represent: ")


def test_apply_instruction_concatenates():
    assert apply_instruction(["x", ""], "Q: ") == ["Q: x", "Q: "]


def test_length_sorted_batches():
    lengths = [3, 10, 1, 10, 7]
    batches = length_sorted_batches(lengths, 2)
    assert batches == [[1, 3], [4, 0], [2]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert length_sorted_batches([], 4) == []


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_length_sorted_batches_rejects_bad_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([1, 2], batch_size)
