"""Tokenisation equals the official tokenizer call recorded in the fixture."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from clipedge.errors import TextInputError
from clipedge.inputs.text import TextTokenizer, apply_instruction, as_text_list, check_text
from clipedge.pipeline import check_batch_size
from clipedge.towers.text import text_feeds

FIXTURE = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny"
PAD_ID = 1


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURE / "expected" / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(FIXTURE / "checkpoint" / "tokenizer.json")


def encode(tokenizer: TextTokenizer, texts: list[str], max_length: int):
    """Tokenise and pad as the runtime's batch stage does: (input_ids, attention_mask)."""
    feeds = text_feeds(tokenizer.tokenize(texts, max_length), PAD_ID)
    return feeds["input_ids"], feeds["attention_mask"]


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
    input_ids, attention_mask = encode(tokenizer, texts, max_length)
    expected = padded(manifest[key])
    assert input_ids.dtype == np.int64 and attention_mask.dtype == np.int64
    np.testing.assert_array_equal(input_ids, expected)
    lengths = [len(row) for row in manifest[key]]
    np.testing.assert_array_equal(attention_mask.sum(axis=1), lengths)


def test_batch_ids_equal_fixture_batch(tokenizer, manifest):
    order = np.load(FIXTURE / "expected" / "text_batch_order.npy")
    input_ids, _ = encode(tokenizer, [manifest["texts"][i] for i in order], 512)
    expected = np.load(FIXTURE / "expected" / "text_batch_input_ids.npy")
    np.testing.assert_array_equal(input_ids, expected)


def test_truncation_keeps_closing_token_for_every_length(tokenizer, manifest):
    long_text = manifest["texts"][6]
    full = encode(tokenizer, [long_text], 8192)[0][0].tolist()
    for max_length in (3, 4, 17, 100):
        ids = encode(tokenizer, [long_text], max_length)[0][0].tolist()
        assert ids == full[: max_length - 1] + [full[-1]]


def test_single_items_match_batched_rows(tokenizer, manifest):
    batch, mask = encode(tokenizer, manifest["texts"], 512)
    for row, text in enumerate(manifest["texts"]):
        single, _ = encode(tokenizer, [text], 512)
        width = single.shape[1]
        np.testing.assert_array_equal(batch[row, :width], single[0])
        assert not mask[row, width:].any()


def test_concurrent_calls_with_different_lengths(tokenizer, manifest):
    texts = manifest["texts"]
    expected = {n: encode(tokenizer, texts, n)[0] for n in (8, 16, 512)}
    failures: list[int] = []

    def work(max_length: int) -> None:
        for _ in range(20):
            if not np.array_equal(encode(tokenizer, texts, max_length)[0], expected[max_length]):
                failures.append(max_length)

    threads = [threading.Thread(target=work, args=(n,)) for n in (8, 16, 512) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_literal_pad_token_is_masked_like_the_model_does(tokenizer):
    input_ids, attention_mask = encode(tokenizer, ["a <pad> b"], 512)
    np.testing.assert_array_equal(attention_mask, (input_ids != PAD_ID).astype(np.int64))
    assert attention_mask.sum() < input_ids.shape[1]


def test_empty_batch(tokenizer):
    input_ids, attention_mask = encode(tokenizer, [], 512)
    assert input_ids.shape == attention_mask.shape == (0, 0)


@pytest.mark.parametrize(("bad", "type_name"), [(None, "NoneType"), (3, "int"), (b"x", "bytes")])
def test_non_string_item_names_index(bad, type_name):
    with pytest.raises(TextInputError, match=f"item 3: expected str, got {type_name}"):
        check_text(bad, 3)


def test_lone_surrogate_names_item_and_position():
    with pytest.raises(TextInputError, match=r"item 2: not valid Unicode.*\\ud800.* 3"):
        check_text("abc\ud800def", 2)


@pytest.mark.parametrize("whole", [None, 42, 1.5, b"bytes", bytearray(b"x")])
def test_whole_input_of_the_wrong_kind_is_refused(whole):
    with pytest.raises(TypeError, match="expected a string or a list of strings"):
        as_text_list(whole)
    assert as_text_list("a") == (["a"], True)
    assert as_text_list(("a", "b")) == (["a", "b"], False)


def test_apply_instruction_concatenates():
    assert apply_instruction(["x", ""], "Q: ") == ["Q: x", "Q: "]


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_is_refused(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        check_batch_size(batch_size)
    assert check_batch_size(np.int64(4)) == 4


def _long_texts() -> dict[str, str]:
    """Texts far past 512 tokens, of the kinds a cut can get wrong."""
    rng = np.random.default_rng(0)
    words = ["cat", "sofa", "über", "naïve", "🙂", "Straße", "a", "fox", "—", "x" * 40]
    latin = " ".join(rng.choice(words) for _ in range(20_000))
    return {
        "latin words": latin,
        "no spaces (CJK)": "赤いソファに座っている猫の写真です" * 2_000,
        "runs of spaces": "a   b    c " * 5_000,
        "control characters the normaliser drops, then words": "\x00\x01\x02" * 40_000 + latin,
        "one long word": "abc" * 100_000,
        "trailing spaces": "word " * 4_000 + " " * 50_000,
    }


@pytest.mark.parametrize("max_length", [16, 512, 2048])
@pytest.mark.parametrize("kind", list(_long_texts()))
def test_cut_before_tokenising_keeps_the_whole_texts_tokens(tokenizer, kind, max_length):
    text = _long_texts()[kind]
    whole = tokenizer._tokenizer.encode(text).ids
    expected = whole if len(whole) <= max_length else whole[: max_length - 1] + whole[-1:]
    assert tokenizer.tokenize([text], max_length) == [expected]


def test_huge_text_costs_what_a_long_text_costs(tokenizer):
    import time

    huge = "The quick brown fox jumps over the lazy dog. " * 230_000  # ~10 MB
    start = time.perf_counter()
    ids = tokenizer.tokenize([huge], 512)[0]
    assert time.perf_counter() - start < 0.5  # whole: seconds and > 1 GB
    assert len(ids) == 512 and ids[-1] == tokenizer.tokenize(["a"], 512)[0][-1]
