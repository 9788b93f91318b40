"""Reading a request: the API key, the JSON body within a size cap and the deadline, and
whether the client is still there."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from .errors import ApiError

# Bodies at least this large are parsed off the event loop.
LARGE_BODY = 1 << 20
T = TypeVar("T")


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


async def unless_disconnected(request: Any, work: Awaitable[T]) -> T:
    """`work`'s result, or 499 once the client has closed the connection first: `work` is
    cancelled then, so a client that gave up (a timed-out caller, an attacker) costs no more
    preparation or model time (its queued items are dropped)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler cancelled (shutdown): so is the work
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "the client closed the connection", code="client_closed")
    return task.result()


async def _disconnected(request: Any) -> None:
    """Returns when the client has gone (the body is read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
