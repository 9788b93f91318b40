"""The FastAPI application: routes, the error mapping, readiness and metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import clipedge
from clipedge.errors import ClipEdgeError

from .access_log import AccessLog
from .errors import ApiError, api_error
from .metrics import Metrics
from .requests import parse_request
from .service import Service
from .settings import ServeSettings

log = logging.getLogger("clipedge.serve")


def _authorised(request: Request, key: str | None) -> bool:
    if key is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


async def _read_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def create_app(settings: ServeSettings, model: clipedge.ClipEdgeModel | None = None) -> FastAPI:
    """The service as an ASGI app; `model`: one `open_model` already opened (else it is
    opened in the background, and /ready says why if that fails)."""
    metrics = Metrics()
    service = Service(settings, metrics, model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start() -> None:
            try:
                await run_in_threadpool(service.start)
            except Exception as exc:  # stays not-ready; /ready says why
                service.failed = f"{type(exc).__name__}: {exc}"
                log.exception("the model could not be loaded")

        starting = asyncio.create_task(start())
        yield
        await starting
        await run_in_threadpool(service.close)

    app = FastAPI(title="clipedge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    app.add_middleware(AccessLog, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, {**exc.headers, "x-error-code": exc.code})

    @app.exception_handler(ClipEdgeError)
    async def clipedge_error(request: Request, exc: ClipEdgeError) -> JSONResponse:
        return await api_error_response(request, api_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error_response(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        error = ApiError(500, f"internal error ({type(exc).__name__}); see the server log")
        return await api_error_response(request, error)

    @app.get("/health")
    async def health() -> JSONResponse:
        # A model that failed to load will not recover: let a supervisor restart the process.
        if service.failed:
            return JSONResponse({"status": "failed", "reason": service.failed}, 503)
        return JSONResponse({"status": "alive"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if service.healthy():
            return JSONResponse({"status": "ready"})
        why = service.failed or (
            "a batcher stopped making progress" if service.ready else "loading"
        )
        return JSONResponse({"status": "not ready", "reason": why}, 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        if not _authorised(request, settings.api_key):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "owned_by": "clipedge"}],
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        deadline = time.monotonic() + settings.request_timeout
        if not _authorised(request, settings.api_key):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )
        if service.failed:
            raise ApiError(503, f"the model could not be loaded: {service.failed}", code="failed")
        if not service.ready:
            raise ApiError(
                503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"}
            )
        body = await _read_body(request, settings.max_body_bytes)
        model = service.model
        parsed = parse_request(
            body, settings, model.manifest.embed_dim, model.manifest.task_instructions
        )
        return await service.embed(parsed, deadline)

    return app
