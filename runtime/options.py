"""One options object for every consumer: `clipedge.load`, `clipedge serve` and `clipedge embed`.

Each limit is a field here, validated once when the object is made, and every consumer (the
library, the server, the batch tool and its worker processes, verify) builds its towers from
the same object, so no limit is forgotten on one path. The server and the batch tool derive
their command-line flags from these fields (`add_arguments`), so a new limit is a flag
everywhere at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError
from .inputs.fetch import DEFAULT_MAX_URL_BYTES, DEFAULT_URL_TIMEOUT, UrlPolicy

# Pillow's own warning threshold (about 9459 x 9459, 268 MB as decoded RGB). Pillow refuses
# images above twice its threshold, so larger limits also need Image.MAX_IMAGE_PIXELS raised.
DEFAULT_MAX_PIXELS = 89_478_485
# max_length counts the special tokens `<s>` and `</s>`: leave room for one content token.
MIN_MAX_LENGTH = 3


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Options:
    """Input limits and run settings shared by the library, the server and the batch tool."""

    max_length: int | None = field(
        default=None,
        metadata=_help("text tokens kept per item (default: the bundle's default_max_length)"),
    )
    max_image_pixels: int | None = field(
        default=DEFAULT_MAX_PIXELS,
        metadata=_help("largest image accepted, in pixels (none: Pillow's own guard only)"),
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata=_help(
            "padded tokens per model run: rows x the longest row, an image its tokens in the "
            "tower (default: no limit; clipedge serve: 8192); a longer text alone is refused"
        ),
    )
    allow_urls: bool = field(default=False, metadata=_help("fetch http(s) image URLs"))
    allow_private_urls: bool = field(
        default=False, metadata=_help("also from private, loopback and link-local addresses")
    )
    url_timeout: float = field(
        default=DEFAULT_URL_TIMEOUT, metadata=_help("seconds for a whole URL fetch")
    )
    max_url_bytes: int = field(
        default=DEFAULT_MAX_URL_BYTES, metadata=_help("largest image body fetched from a URL")
    )
    allow_files: bool = field(
        default=True,
        metadata=_help("read image items given as local file paths (the server never does)"),
    )
    verify_checksums: bool | None = field(
        default=None,
        metadata=_help(
            "sha256 of every bundle file against the manifest: on: at every load; off: never "
            "(sizes only); default: at the first load on this machine, then a stamp in the "
            "cache (a changed file is hashed again)"
        ),
    )
    threads: int | None = field(
        default=None, metadata=_help("inference threads (default: the backend's choice)")
    )
    preprocess_workers: int | None = field(
        default=None, metadata=_help("image decoding threads (default: one per CPU)")
    )

    def __post_init__(self) -> None:
        _check_int("max_length", self.max_length, MIN_MAX_LENGTH, none_ok=True)
        _check_int("max_image_pixels", self.max_image_pixels, 1, none_ok=True)
        _check_int("max_batch_tokens", self.max_batch_tokens, MIN_MAX_LENGTH, none_ok=True)
        _check_int("max_url_bytes", self.max_url_bytes, 1)
        _check_int("threads", self.threads, 1, none_ok=True)
        _check_int("preprocess_workers", self.preprocess_workers, 1, none_ok=True)
        timeout = self.url_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise OptionError(f"url_timeout must be a positive number of seconds, got {timeout!r}")
        for name in ("allow_urls", "allow_private_urls", "allow_files"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.verify_checksums is None or isinstance(self.verify_checksums, bool)):
            raise OptionError(
                "verify_checksums must be None (once, then a stamp), True (every load) or "
                f"False (never), got {self.verify_checksums!r}"
            )

    @property
    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(
            allow_urls=self.allow_urls,
            allow_private=self.allow_private_urls,
            timeout=float(self.url_timeout),
            max_bytes=self.max_url_bytes,
        )

    def replace(self, **changes: Any) -> Options:
        """A copy with `changes` (keyword names are checked: a typo is an error)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; options are: {option_names()}")
        return dataclasses.replace(self, **changes)


def option_names() -> str:
    return ", ".join(f.name for f in dataclasses.fields(Options))


def _check_int(name: str, value: Any, minimum: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if none_ok else "")
        raise OptionError(f"{name} must be {allowed}, got {value!r}")


# ----- flags and environment variables --------------------------------------------------

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}")


def _parser_for(item: dataclasses.Field) -> Any:
    kind = str(item.type).split(" |")[0]
    if kind == "bool":
        return _parse_bool
    number = {"int": int, "float": float}.get(kind)
    if number is None:
        return str
    if "None" in str(item.type):
        return lambda text: None if text.strip().lower() in ("", "none") else number(text)
    return number


def add_arguments(
    parser: argparse.ArgumentParser,
    settings_type: type,
    env_prefix: str | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One `--flag` per field of the dataclass `settings_type` (bools as switches). With
    `env_prefix`, `PREFIX<FIELD>` variables set the defaults, parsed as the flags are; a bad
    value is one line naming the variable."""
    for item in dataclasses.fields(settings_type):
        if item.name in skip or item.init is False:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not dataclasses.MISSING else None
        convert = _parser_for(item)
        env = f"{env_prefix}{item.name.upper()}" if env_prefix else None
        if env and env in os.environ:
            try:
                default = convert(os.environ[env])
            except ValueError as exc:
                parser.error(f"${env}={os.environ[env]!r}: {exc}")
        help_text = item.metadata.get("help", "")
        help_text += f" (default {default})" + (f", ${env}" if env else "")
        if convert is _parse_bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=convert, default=default, help=help_text)


def from_arguments(args: argparse.Namespace, settings_type: type = Options, **extra: Any) -> Any:
    """The dataclass `settings_type` from parsed flags (fields without a flag from `extra`)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(settings_type)
        if f.init and hasattr(args, f.name)
    }
    return settings_type(**values, **extra)
