"""Reading a request: the API key, and the JSON body within a size cap and the deadline."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

from .errors import ApiError

# Bodies at least this large are parsed off the event loop.
LARGE_BODY = 1 << 20


def check_key(headers: Any, key: str | None) -> None:
    """401 (with the `WWW-Authenticate` challenge RFC 6750 asks for) unless the request
    carries `Authorization: Bearer <key>`; compared in constant time."""
    if key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(
            401,
            "missing or wrong API key (Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer realm="clipedge"'},
        )


async def read_json(request: Any, limit: int, deadline: float) -> Any:
    """The parsed body: 413 over `limit` bytes, 408 when it has not all arrived by `deadline`
    (time.monotonic()), 400 for anything that is not JSON, nesting too deep included."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408, "the request body did not arrive within the request timeout", code="body_timeout"
        ) from None
    data = b"".join(chunks)
    if len(data) < LARGE_BODY:
        return parse_json(data)
    return await asyncio.to_thread(parse_json, data)  # the event loop keeps serving meanwhile


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # the C parser stops at the interpreter's recursion limit
        raise ApiError(400, "the request body is nested too deeply", code="too_deep") from None
