"""Access logging: one JSON line per request, and the request metrics by route."""

from __future__ import annotations

import json
import logging
import time
import uuid

from .metrics import Metrics

access_log = logging.getLogger("clipedge.serve.access")


class AccessLog:
    """Pure ASGI middleware (no per-request task, unlike `@app.middleware`): one JSON log
    line, the latency histogram and the request counter by route, code and error code."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode() or uuid.uuid4().hex[:16]
        seen = {"status": 500, "error": ""}

        async def record(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                response_headers = list(message.get("headers") or [])
                for name, value in response_headers:
                    if name == b"x-error-code":
                        seen["error"] = value.decode()
                response_headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": response_headers}
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            elapsed = time.monotonic() - started
            # The matched route's template; one label for every path no route knows, so
            # random paths cannot grow /metrics.
            matched = scope.get("route")
            route = getattr(matched, "path", None) or "unmatched"
            self.metrics.latency.labels(route).observe(elapsed)
            self.metrics.requests.labels(route, str(seen["status"]), seen["error"]).inc()
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"][:200],
                        "status": seen["status"],
                        "ms": round(elapsed * 1000, 2),
                        "client": client[0] if client else None,
                        "error": seen["error"] or None,
                    }
                )
            )
