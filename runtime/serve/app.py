"""The FastAPI application: routes, the error mapping, readiness and metrics."""

from __future__ import annotations

import asyncio
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

from . import schema
from .access_log import AccessLog
from .body import check_key, read_json, unless_disconnected
from .errors import ApiError, api_error
from .metrics import Metrics
from .requests import parse_request
from .service import Service
from .settings import ServeSettings

log = logging.getLogger("clipedge.serve")


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

    app = FastAPI(title="clipedge", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.openapi = lambda: schema.openapi(app)  # type: ignore[method-assign]
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
        error = ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return await api_error_response(request, error)

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
        check_key(request.headers, settings.api_key)
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "owned_by": "clipedge"}],
        }

    @app.post(
        "/v1/embeddings",
        response_model=None,
        responses={200: {"model": schema.EmbeddingResponse}, **schema.ERRORS},
        openapi_extra=schema.REQUEST_BODY,
    )
    async def embeddings(request: Request) -> JSONResponse:
        """Embed texts, images and token ids (the Jina and the OpenAI request)."""
        deadline = time.monotonic() + settings.request_timeout
        check_key(request.headers, settings.api_key)
        if service.failed:
            raise ApiError(503, f"the model could not be loaded: {service.failed}", code="failed")
        if not service.ready:
            raise ApiError(
                503, "the model is still loading", code="not_ready", headers={"Retry-After": "5"}
            )
        if service.active >= settings.max_concurrency:
            raise ApiError(
                429,
                f"{service.active} requests are being served (--max-concurrency); retry shortly",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )
        service.active += 1
        try:
            body = await read_json(request, settings.max_body_bytes, deadline)
            model = service.model
            parsed = parse_request(
                body, settings, model.manifest.embed_dim, model.manifest.task_instructions
            )
            return JSONResponse(await unless_disconnected(request, service.embed(parsed, deadline)))
        finally:
            service.active -= 1

    return app
