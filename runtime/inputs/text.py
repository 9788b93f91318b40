"""Text tokenisation for the text tower, equal to the official `encode_text` tokenizer call.

The official code calls the Hugging Face tokenizer with `padding=True, truncation=True,
max_length=512`: template `<s> A </s>`, at most `max_length` tokens including the specials, and
right padding with `<pad>` to the longest item of the batch. Here the `tokenizers` object is never
reconfigured after construction: truncation is done on the encoded ids (keeping the template's
closing special tokens, as HF truncation does), so one shared instance is safe to use from many
threads and each call may use its own `max_length`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

MIN_MAX_LENGTH = 3
MAX_MAX_LENGTH = 8192


def check_texts(texts: Sequence[str]) -> None:
    """Reject non-string items up front, naming the index (the tokenizer's own error does not)."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"item {index}: expected str, got {type(text).__name__}")


def apply_instruction(texts: Sequence[str], instruction: str) -> list[str]:
    """Prepend a task instruction by plain string concatenation, as the official code does."""
    check_texts(texts)
    return [instruction + text for text in texts]


def check_max_length(max_length: int) -> None:
    """`max_length` counts the special tokens, so it must leave room for one content token."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be an int, got {type(max_length).__name__}")
    if not MIN_MAX_LENGTH <= max_length <= MAX_MAX_LENGTH:
        raise ValueError(
            f"max_length must be in [{MIN_MAX_LENGTH}, {MAX_MAX_LENGTH}], got {max_length}"
        )


class TextTokenizer:
    """Batch tokenizer producing padded `input_ids` and `attention_mask` (int64, [B, L])."""

    def __init__(self, tokenizer_file: str | os.PathLike[str], pad_token_id: int) -> None:
        self._tokenizer = Tokenizer.from_file(os.fspath(tokenizer_file))
        # Settings stored in tokenizer.json would truncate or pad behind our back.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets nobody here reads.
        self._encode_batch = getattr(
            self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch
        )
        self.pad_token_id = pad_token_id
        self._suffix_length = self._template_suffix_length()

    def _template_suffix_length(self) -> int:
        """Number of special tokens the post-processor appends (1 for `<s> A </s>`)."""
        probe = "a"
        bare = self._tokenizer.encode(probe, add_special_tokens=False).ids
        full = self._tokenizer.encode(probe).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return len(full) - start - len(bare)
        raise ValueError("tokenizer post-processor does not wrap the text in special tokens")

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text, `<s> ... </s>`, truncated to `max_length` tokens (no padding)."""
        check_max_length(max_length)
        check_texts(texts)
        keep = max_length - self._suffix_length
        rows = []
        for encoding in self._encode_batch(list(texts)):
            ids = encoding.ids
            if len(ids) > max_length:
                ids = ids[:keep] + ids[len(ids) - self._suffix_length :]
            rows.append(ids)
        return rows

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest row: `input_ids` and `attention_mask`, int64 [B, L].

        The mask is `input_ids != pad_token_id`, which is what the official model computes from
        the ids (it ignores the tokenizer's own mask).
        """
        width = max((len(ids) for ids in rows), default=0)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        for row, ids in zip(input_ids, rows, strict=True):
            row[: len(ids)] = ids
        return input_ids, (input_ids != self.pad_token_id).astype(np.int64)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise, truncate to `max_length` tokens and right-pad to the longest item."""
        return self.pad(self.tokenize(texts, max_length))
