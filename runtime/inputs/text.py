"""Text inputs for the text tower, equal to the official `encode_text` tokenizer call.

The official code calls the Hugging Face tokenizer with `padding=True, truncation=True,
max_length=512`: template `<s> A </s>`, at most `max_length` tokens including the specials, and
right padding with `<pad>` to the longest item of the batch. Here the `tokenizers` object is never
reconfigured after construction: truncation is done on the encoded ids (keeping the template's
closing special tokens, as HF truncation does), so one shared instance is safe to use from many
threads and each call may use its own `max_length`.

A text far longer than `max_length` tokens can use is cut to a character budget before
tokenising (a 10 MB string then costs what a 512-token text costs). The budget keeps enough
characters for `max_length` tokens plus a margin (no vocabulary piece is longer than the
longest token), cut at a space where there is one; if the cut text still yields too few tokens
(e.g. characters the normaliser removes), the budget doubles until it does, the text ends, or
it reaches `MAX_CUT_GROWTH` times its first size. The tokens kept are therefore the ones the
whole text gives, except for such pathological texts, which are cut there (and flagged as
truncated) so that no text costs more than a bounded multiple of `max_length`'s work.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer

from ..errors import TextInputError

# Tokens kept beyond max_length before a cut text is trusted to tokenise like the whole text.
CUT_MARGIN_TOKENS = 16
# A cut text that yields too few tokens (characters the normaliser drops, combining marks)
# grows at most this many times its first size: the work stays bounded by max_length.
MAX_CUT_GROWTH = 16
MIN_CUT_TOKENS = 512


def as_text_list(sentences: Any) -> tuple[list[Any], bool]:
    """The caller's input as a list, and whether it was a single string.

    The whole input must be a string or an iterable of items; each item is checked by
    `check_text` so a bad one is reported by index without losing the others.
    """
    if isinstance(sentences, str):
        return [sentences], True
    if sentences is None or isinstance(
        sentences, (bytes, bytearray, int, float, Mapping, set, frozenset)
    ):
        raise TypeError(
            f"expected a string or a list of strings, got {type(sentences).__name__}"
            + (" (decode bytes to str first)" if isinstance(sentences, bytes | bytearray) else "")
        )
    try:
        return list(sentences), False
    except TypeError as exc:
        raise TypeError(
            f"expected a string or a list of strings, got {type(sentences).__name__}"
        ) from exc


def check_text(text: Any, index: int) -> str:
    """A usable text, or a `TextInputError` naming the item and the reason."""
    if not isinstance(text, str):
        hint = " (decode bytes to str first)" if isinstance(text, bytes | bytearray) else ""
        raise TextInputError(index, f"expected str, got {type(text).__name__}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TextInputError(
            index,
            f"not valid Unicode: lone surrogate {text[exc.start]!r} at character {exc.start}",
        ) from None
    return text


def apply_instruction(texts: Sequence[str], instruction: str) -> list[str]:
    """Prepend a task instruction by plain string concatenation, as the official code does."""
    return [instruction + text for text in texts]


class TextTokenizer:
    """Batch tokenizer: token ids per text, truncated as the official tokenizer call does."""

    def __init__(self, tokenizer_file: str | os.PathLike[str]) -> None:
        self._tokenizer = Tokenizer.from_file(os.fspath(tokenizer_file))
        # The pad id tokenizer.json declares, if any (checked against the manifest's).
        self.declared_pad_id = (self._tokenizer.padding or {}).get("pad_id")
        # Settings stored in tokenizer.json would truncate or pad behind our back.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets nobody here reads.
        self._encode_batch = getattr(
            self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch
        )
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

    def wrapper_ids(self) -> list[int]:
        """The special tokens the post-processor puts around every text (`<s>`, `</s>`)."""
        bare = set(self._tokenizer.encode("a", add_special_tokens=False).ids)
        return [i for i in self._tokenizer.encode("a").ids if i not in bare]

    def special_tokens(self) -> dict[int, str] | None:
        """Id -> text of the tokenizer's special tokens (None: this tokenizers cannot say)."""
        decoder = getattr(self._tokenizer, "get_added_tokens_decoder", None)
        if decoder is None:
            return None
        return {i: token.content for i, token in decoder().items() if token.special}

    def token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Characters in the vocabulary's longest piece: the most one token can cover."""
        return max(len(piece) for piece in self._tokenizer.get_vocab())

    def _cut(self, text: str, tokens: int) -> str:
        """A prefix of `text` that surely holds `tokens` tokens unless the normaliser drops
        characters: at most two margins more, ending at a space past the first margin if any."""
        start = self.longest_token_chars * (tokens + CUT_MARGIN_TOKENS)
        if len(text) <= start + self.longest_token_chars * CUT_MARGIN_TOKENS:
            return text
        cut = text[: start + self.longest_token_chars * CUT_MARGIN_TOKENS]
        space = cut.rfind(" ", start)
        return cut[:space] if space > 0 else cut

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        keep = max_length - self._suffix_length
        return ids[:keep] + ids[len(ids) - self._suffix_length :]

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text, `<s> ... </s>`, truncated to `max_length` tokens (no padding)."""
        return self.tokenize_with_flags(texts, max_length)[0]

    def tokenize_with_flags(
        self, texts: Sequence[str], max_length: int
    ) -> tuple[list[list[int]], list[bool]]:
        """`tokenize`, and per text whether truncation dropped tokens (a server may refuse
        those instead of embedding a cut text)."""
        cut = [self._cut(text, max_length) for text in texts]
        rows = [encoding.ids for encoding in self._encode_batch(cut)]
        for index, text in enumerate(texts):
            # A cut text must still give the margin beyond max_length; else widen the cut.
            tokens = max_length
            while (
                len(cut[index]) < len(text)
                and len(rows[index]) < max_length + CUT_MARGIN_TOKENS
                and tokens < max(max_length, MIN_CUT_TOKENS) * MAX_CUT_GROWTH
            ):
                tokens *= 2
                cut[index] = self._cut(text, tokens)
                rows[index] = self._tokenizer.encode(cut[index]).ids
        truncated = [
            len(ids) > max_length or len(part) < len(text)
            for ids, part, text in zip(rows, cut, texts, strict=True)
        ]
        return [self._truncate(ids, max_length) for ids in rows], truncated
