"""Per-item input errors: every bad input is reported with its index and the reason."""

from __future__ import annotations


class InputError(ValueError):
    """One input could not be used; the message names the item index and the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"item {index}: {reason}")
        self.index = index
        self.reason = reason


class TextInputError(InputError):
    """A text input could not be used."""


class ImageInputError(InputError):
    """An image input could not be used (decoding, size, fetching)."""
