"""Every error clipedge raises on purpose, under one root, in three families.

- `InputError`: one item (a text, an image, a record) cannot be used. It names the item's
  index and the reason; the other items go on. A server answers it with a 4xx, a batch job
  writes an error row.
- `BundleError`: the bundle on disk is missing, corrupt, or disagrees with itself.
- `BackendError`: the inference engine failed or returned what no valid graph returns.

`OptionError` is a bad setting (an option, a flag, a request parameter): a `ValueError` too,
so `except ValueError` keeps working. The HTTP mapping (`clipedge.serve.errors`) and the CLI
mapping (`clipedge.cli`) each exist once and read only these classes.
"""

from __future__ import annotations


class ClipEdgeError(Exception):
    """The root of every error clipedge raises on purpose (a user can cause each of them)."""


class OptionError(ClipEdgeError, ValueError):
    """An option, flag or request parameter is outside its valid range."""


class OptionTypeError(OptionError, TypeError):
    """An option of the wrong type (also a `TypeError`, as Python's own checks raise)."""


class InputError(ClipEdgeError, ValueError):
    """One input could not be used; the message names the item index and the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"item {index}: {reason}")
        self.index = index
        self.reason = reason

    def __reduce__(self):  # survives pickling into and out of worker processes
        return type(self), (self.index, self.reason)


class TextInputError(InputError):
    """A text input could not be used."""


class ImageInputError(InputError):
    """An image input could not be used (decoding, size, fetching)."""


class EngineLimitError(InputError):
    """An item is larger than the engine can take (e.g. longer than every TensorRT profile):
    a property of the input against this deployment, so a client error, never a server one."""


class SourceError(ClipEdgeError, ValueError):
    """A batch source (folder, list file, table) cannot be read or lacks what was asked."""


class BundleError(ClipEdgeError, RuntimeError):
    """A bundle directory is missing, incomplete, corrupt or written by a newer clipedge."""


class BackendError(ClipEdgeError, RuntimeError):
    """The inference engine failed (on one item: `index`, and `reason` without the index),
    or is not installed here."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason if index is None else f"item {index}: {reason}")
        self.index = index
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason, self.index)


class NonFiniteEmbeddingError(BackendError):
    """A tower returned NaN or Inf for some items: a corrupt graph, never a valid embedding."""

    def __init__(self, tower: str, items: list[int]) -> None:
        items = sorted(items)
        more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
        reason = (
            f"the {tower} tower returned NaN/Inf; the bundle may be corrupt: load it with "
            "verify_checksums=True to check its files, or export it again"
        )
        ClipEdgeError.__init__(self, f"item {items[0]}{more}: {reason}")
        self.index, self.reason = items[0], reason
        self.tower = tower
        self.items = items

    def __reduce__(self):
        return type(self), (self.tower, self.items)
