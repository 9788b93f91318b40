"""The text tower: validate, apply the task instruction, tokenise; token rows to graph feeds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.manifest import Manifest, TowerManifest
from ..errors import BundleError, InputError, OptionError
from ..inputs.text import TextTokenizer, apply_instruction, check_text
from ..options import MIN_MAX_LENGTH, Options
from . import TEXT, Prepared


@dataclass
class PreparedTexts(Prepared):
    """Token ids per text (None where the item failed), and whether truncation to
    `max_length` dropped tokens (a server may refuse those instead of embedding a cut text)."""

    token_ids: list[list[int] | None]
    truncated: list[bool]

    def row(self, item: int) -> list[int] | None:
        return self.token_ids[item]


def text_feeds(rows: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, np.ndarray]:
    """`input_ids` right-padded to the longest row and `attention_mask`, int64 [B, L].

    The mask is `input_ids != pad_token_id`, which is what the official model computes from
    the ids (it ignores the tokenizer's own mask).
    """
    width = max((len(ids) for ids in rows), default=0)
    input_ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    for row, ids in zip(input_ids, rows, strict=True):
        row[: len(ids)] = ids
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_token_id).astype(np.int64)}


def _declared_pad_token(tokenizer_file: Path) -> str | None:
    """The pad token that `special_tokens_map.json` beside the tokenizer names, if any."""
    try:
        data = json.loads((tokenizer_file.parent / "special_tokens_map.json").read_text())
    except (OSError, ValueError):
        return None
    pad = data.get("pad_token") if isinstance(data, dict) else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return pad if isinstance(pad, str) else None


def check_pad_token(tokenizer: TextTokenizer, pad_token_id: int, path: Path) -> None:
    """The manifest's pad id against the tokenizer: in its vocabulary, one of its special
    tokens, the pad token its own files declare, and not one of the tokens it wraps every
    text in (the attention mask is `ids != pad`: it would hide them)."""
    field = f"towers.text.settings.pad_token_id {pad_token_id}"
    if not 0 <= pad_token_id < tokenizer.vocab_size:
        raise BundleError(
            f"{field} is not in the tokenizer's vocabulary ({path}: {tokenizer.vocab_size} tokens)"
        )
    token = tokenizer.token(pad_token_id)
    special = tokenizer.special_tokens()
    if special is not None and pad_token_id not in special:
        raise BundleError(f"{field} is {token!r} in {path}, not one of its special tokens")
    if pad_token_id in tokenizer.wrapper_ids():
        raise BundleError(
            f"{field} ({token!r}) is a token the tokenizer puts around every text: the "
            "attention mask (ids != pad) would hide it"
        )
    declared_token = _declared_pad_token(path)
    declared = [tokenizer.declared_pad_id]
    declared.append(None if declared_token is None else tokenizer.token_id(declared_token))
    for other in declared:
        if other is not None and other != pad_token_id:
            raise BundleError(
                f"{field} ({token!r}), but the tokenizer's files declare pad id {other} "
                f"({tokenizer.token(other)!r})"
            )


class TextTower:
    """Texts -> token rows -> `input_ids` / `attention_mask`, as the official `encode_text`.

    `max_length` (tokens kept per text, special tokens included) is one policy everywhere:
    the bundle's `default_max_length` (512, the official default) unless `Options.max_length`
    or a call says otherwise, and never above the bundle's `max_length` (8192).
    """

    spec = TEXT
    sort_window = 4

    def __init__(
        self, entry: TowerManifest, bundle_dir: Path, manifest: Manifest, options: Options
    ) -> None:
        settings = entry.settings
        path = bundle_dir / settings.tokenizer
        try:
            self.tokenizer = TextTokenizer(path)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc
        check_pad_token(self.tokenizer, settings.pad_token_id, path)
        self.pad_token_id = settings.pad_token_id
        self.pooling = entry.pooling
        self.instructions = manifest.task_instructions
        self.max_length_limit = settings.max_length
        self.default_max_length = settings.default_max_length
        self.default_max_length = self.max_length(options.max_length)

    def instruction(self, task: str | None) -> str:
        """The prefix for a task ("" for None); unknown tasks are refused, listing valid ones."""
        if task is None:
            return ""
        if task not in self.instructions:
            raise OptionError(
                f"unknown task {task!r}; valid tasks: {', '.join(self.instructions)} (or None)"
            )
        return self.instructions[task]

    def max_length(self, requested: Any = None) -> int:
        """The token limit for a call: `requested`, else the default, checked against the
        bundle's range (NumPy integers accepted)."""
        if requested is None:
            return self.default_max_length
        if isinstance(requested, bool) or not isinstance(requested, int | np.integer):
            raise OptionError(f"max_length must be an int, got {type(requested).__name__}")
        if not MIN_MAX_LENGTH <= requested <= self.max_length_limit:
            raise OptionError(
                f"max_length must be in [{MIN_MAX_LENGTH}, {self.max_length_limit}], "
                f"got {requested}"
            )
        return int(requested)

    def prepare(
        self,
        items: Sequence[Any],
        offset: int = 0,
        *,
        task: str | None = None,
        max_length: int | None = None,
    ) -> PreparedTexts:
        """Token ids for every valid text; bad items get their error (index `offset + i`)."""
        prefix = self.instruction(task)
        max_length = self.max_length(max_length)
        errors: list[InputError | None] = [None] * len(items)
        valid: list[int] = []
        for position, text in enumerate(items):
            try:
                check_text(text, offset + position)
            except InputError as exc:
                errors[position] = exc
                continue
            valid.append(position)
        rows, cut = self.tokenizer.tokenize_with_flags(
            apply_instruction([items[i] for i in valid], prefix), max_length
        )
        token_ids: list[list[int] | None] = [None] * len(items)
        truncated = [False] * len(items)
        for position, ids, was_cut in zip(valid, rows, cut, strict=True):
            token_ids[position] = ids
            truncated[position] = was_cut
        return PreparedTexts(errors, token_ids, truncated)

    def feeds(self, rows: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        return text_feeds(rows, self.pad_token_id)

    def length(self, row: Sequence[int]) -> int:
        return len(row)

    tokens = length

    def batch_order(self, rows: Sequence[Any], items: Sequence[int]) -> list[int]:
        """Longest first (ties in input order), as the official `encode_text` sorts, so a
        batch pads little."""
        return sorted(items, key=lambda item: -len(rows[item]))

    def close(self) -> None:
        pass
