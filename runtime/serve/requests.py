"""Embedding requests in the Jina and the OpenAI form, parsed into plain items and options.

Jina: `input` is a string, or a list of strings and objects `{"text"}`, `{"image": URL |
base64 | data URI}`, `{"url"}`, `{"bytes": base64}`; options `dimensions` (int or numeric
string), `normalized`, `task`, `truncate`, `embedding_type` / `encoding_type` (one or a list
of float, base64, binary, ubinary). OpenAI: `input` is a string, a list of strings, or token
ids (one list of ints, or a list of them); `encoding_format` float or base64; `user` ignored.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .encodings import ENCODINGS
from .errors import ApiError
from .settings import ServeSettings

# Item kinds (what a client sent), not tower names: token ids go to the text tower too.
TEXT_ITEM, IMAGE, TOKENS = "text", "image", "tokens"


@dataclass(frozen=True)
class Item:
    """One input: `kind` TEXT_ITEM (str), IMAGE (URL, data URI or bytes) or TOKENS (ids)."""

    kind: str
    value: Any


@dataclass(frozen=True)
class EmbeddingRequest:
    items: list[Item]
    dimensions: int | None
    normalized: bool
    task: str | None
    truncate: bool
    encodings: list[str]
    keyed: bool  # several encodings asked for: each `embedding` is an object keyed by type


def _image_value(value: Any, index: int) -> Any:
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"item {index}: image must be a non-empty string", "input")
    if value.startswith(("http://", "https://", "data:")):
        return value
    return _base64(value, index)


def _base64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, f"item {index}: bytes must be a base64 string", "input")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"item {index}: not valid base64 ({exc})", "input") from None


# The Jina API's item objects: {key: value} -> the item.
OBJECT_ITEMS = {
    "text": lambda value, index: Item(TEXT_ITEM, _text(value, index)),
    "image": lambda value, index: Item(IMAGE, _image_value(value, index)),
    "url": lambda value, index: Item(IMAGE, _url(value, index)),
    "bytes": lambda value, index: Item(IMAGE, _base64(value, index)),
}


def _text(value: Any, index: int) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"item {index}: text must be a string", "input")
    return value


def _url(value: Any, index: int) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"item {index}: url must be a string", "input")
    return value


def _item(raw: Any, index: int) -> Item:
    if isinstance(raw, str):
        return Item(TEXT_ITEM, raw)
    if isinstance(raw, list) and raw and all(type(x) is int for x in raw):
        return Item(TOKENS, raw)
    if isinstance(raw, dict) and len(raw) == 1:
        ((key, value),) = raw.items()
        if key in OBJECT_ITEMS:
            return OBJECT_ITEMS[key](value, index)
    raise ApiError(
        400,
        f"item {index}: expected a string, a list of token ids, or one of {{'text'}}, "
        "{'image'}, {'url'}, {'bytes'}",
        "input",
    )


def _items(raw: Any, settings: ServeSettings) -> list[Item]:
    if isinstance(raw, str) or (isinstance(raw, list) and raw and type(raw[0]) is int):
        raw = [raw]  # one string, or one token array
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "input must be a non-empty string or list", "input")
    if len(raw) > settings.max_inputs:
        raise ApiError(
            413,
            f"{len(raw)} inputs exceed the limit of {settings.max_inputs} per request",
            "input",
        )
    items = [_item(value, index) for index, value in enumerate(raw)]
    for index, item in enumerate(items):
        if item.kind == TEXT_ITEM and not item.value:
            raise ApiError(400, f"item {index}: empty string", "input")
        if item.kind == TEXT_ITEM and len(item.value) > settings.max_text_chars:
            raise ApiError(
                413,
                f"item {index}: {len(item.value)} characters exceed the limit of "
                f"{settings.max_text_chars}",
                "input",
            )
    return items


def _dimensions(raw: Any, embed_dim: int) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= embed_dim:
        raise ApiError(400, f"dimensions must be an integer from 1 to {embed_dim}", "dimensions")
    return raw


def _encodings(body: dict[str, Any]) -> tuple[list[str], bool]:
    names = [k for k in ("embedding_type", "encoding_type", "encoding_format") if k in body]
    raw = body[names[0]] if names else "float"
    keyed = isinstance(raw, list)
    values = raw if keyed else [raw]
    if not values or not all(isinstance(v, str) and v in ENCODINGS for v in values):
        raise ApiError(400, f"{names[0]} must be one or a list of {list(ENCODINGS)}", names[0])
    return list(dict.fromkeys(values)), keyed


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", name)
    return value


def parse_request(
    body: Any, settings: ServeSettings, embed_dim: int, tasks: dict[str, str]
) -> EmbeddingRequest:
    """The request's items and options; `ApiError` naming the field (and item) otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", settings.model_name)
    if model != settings.model_name:
        raise ApiError(
            404,
            f"model {model!r} is not served here (this server: {settings.model_name!r})",
            "model",
            "model_not_found",
        )
    if "input" not in body:
        raise ApiError(400, "input is required", "input")
    task = body.get("task")
    if task is not None and task not in tasks:
        raise ApiError(400, f"task must be one of {list(tasks)} or absent", "task")
    encodings, keyed = _encodings(body)
    return EmbeddingRequest(
        items=_items(body["input"], settings),
        dimensions=_dimensions(body.get("dimensions"), embed_dim),
        normalized=_flag(body, "normalized", True),
        task=task,
        truncate=_flag(body, "truncate", False),
        encodings=encodings,
        keyed=keyed,
    )
