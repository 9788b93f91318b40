"""The prepare stage: raw inputs -> validated, tokenised or preprocessed items, one error each.

A bad item becomes an `InputError` in its slot (index and reason) and the others go on, so a
server fails only that item's request and a batch tool writes one error row for it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..inputs.errors import InputError
from ..inputs.images import ImageLoader, ImagePreprocessor, preprocess_images_collect
from ..inputs.text import TextTokenizer, apply_instruction, check_max_length, check_text


@dataclass
class PreparedTexts:
    """Token ids per text (None where the item failed), each item's error (or None) and
    whether truncation to `max_length` dropped tokens."""

    token_ids: list[list[int] | None]
    errors: list[InputError | None]
    truncated: list[bool]

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) if ids is not None else 0 for ids in self.token_ids]

    def first_error(self) -> InputError | None:
        return next((error for error in self.errors if error is not None), None)


@dataclass
class PreparedImages:
    """Pixels [N, 3, S, S] float32 (zeros where the item failed), each item's error (or None)
    and its decoded size (width, height) before resizing (None where it failed)."""

    pixels: np.ndarray
    errors: list[InputError | None]
    sizes: list[tuple[int, int] | None]

    def first_error(self) -> InputError | None:
        return next((error for error in self.errors if error is not None), None)


class TextPreparer:
    """Validates texts, applies the task instruction and tokenises, as `encode_text` does."""

    def __init__(
        self, tokenizer: TextTokenizer, instructions: dict[str, str], max_length_limit: int
    ) -> None:
        self.tokenizer = tokenizer
        self.instructions = instructions
        self.max_length_limit = max_length_limit

    def instruction(self, task: str | None) -> str:
        """The prefix for a task ("" for None); unknown tasks are refused, listing valid ones."""
        if task is None:
            return ""
        if task not in self.instructions:
            raise ValueError(
                f"unknown task {task!r}; valid tasks: {', '.join(self.instructions)} (or None)"
            )
        return self.instructions[task]

    def check_max_length(self, max_length: Any) -> int:
        max_length = check_max_length(max_length)
        if max_length > self.max_length_limit:
            raise ValueError(
                f"max_length must be at most {self.max_length_limit}, got {max_length}"
            )
        return max_length

    def prepare(
        self, texts: Sequence[Any], task: str | None = None, max_length: int = 512
    ) -> PreparedTexts:
        """Token ids for every valid text; bad items get their error, the rest go on."""
        prefix = self.instruction(task)
        max_length = self.check_max_length(max_length)
        errors: list[InputError | None] = [None] * len(texts)
        valid: list[int] = []
        for index, text in enumerate(texts):
            try:
                check_text(text, index)
            except InputError as exc:
                errors[index] = exc
                continue
            valid.append(index)
        rows, cut = self.tokenizer.tokenize_with_flags(
            apply_instruction([texts[i] for i in valid], prefix), max_length
        )
        token_ids: list[list[int] | None] = [None] * len(texts)
        truncated = [False] * len(texts)
        for index, ids, was_cut in zip(valid, rows, cut, strict=True):
            token_ids[index] = ids
            truncated[index] = was_cut
        return PreparedTexts(token_ids, errors, truncated)


class ImagePreparer:
    """Decodes (or fetches) and preprocesses images in a thread pool (Pillow releases the GIL)."""

    def __init__(
        self, preprocessor: ImagePreprocessor, load: ImageLoader, workers: int | None = None
    ) -> None:
        self.preprocessor = preprocessor
        self._load = load
        self._workers = workers or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, "clipedge-decode")
            return self._executor

    def prepare(self, items: Sequence[Any], offset: int = 0) -> PreparedImages:
        """Pixels for every valid image; errors name `offset + position` (the caller's index)."""
        sizes: list[tuple[int, int] | None] = [None] * len(items)

        def load(item: Any, position: int) -> Image.Image:
            image = self._load(item, offset + position)
            sizes[position] = image.size
            return image

        pixels, errors = preprocess_images_collect(
            items, self.preprocessor, load=load, executor=self._pool(), first_index=offset
        )
        return PreparedImages(pixels, list(errors), sizes)

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
