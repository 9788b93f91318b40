"""The FastAPI application: routes, errors, readiness, metrics and access logs."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import clipedge
from clipedge.postprocess import truncate_and_normalize

from .batcher import QueueFull, TowerBatcher
from .encodings import encode
from .errors import ApiError
from .metrics import Metrics
from .requests import EmbeddingRequest, parse_request
from .settings import ServeSettings

log = logging.getLogger("clipedge.serve")
access_log = logging.getLogger("clipedge.serve.access")
# Usage as the hosted API prices images: per 512x512 tile of the image, partial tiles count.
TOKENS_PER_TILE = 4000
TILE = 512


def open_model(settings: ServeSettings) -> clipedge.ClipEdgeModel:
    """The service's model: manifest, plan and tokenizer; sessions open on first use, so this
    is quick and `clipedge serve` calls it before listening, to fail fast on a bad bundle."""
    return clipedge.load(
        settings.bundle,
        backend=settings.backend,
        precision=settings.precision,
        threads=settings.threads,
        allow_urls=settings.allow_urls,
        allow_private_urls=settings.allow_private_urls,
        url_timeout=settings.url_timeout,
        preprocess_workers=settings.prepare_workers,
    )


class Service:
    """The loaded model and one batcher per tower; `ready` once a warm-up has run."""

    def __init__(
        self,
        settings: ServeSettings,
        metrics: Metrics,
        opened: clipedge.ClipEdgeModel | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.opened = opened
        self.model: clipedge.ClipEdgeModel | None = None
        self.batchers: dict[str, TowerBatcher] = {}
        self.ready = False
        self.failed: str | None = None

    def start(self) -> None:
        """Load (unless opened already), start the batchers and warm every tower up, which
        opens the sessions (blocking; run in a thread)."""
        s = self.settings
        model = self.opened or open_model(s)
        for tower in model.manifest.towers:
            self.batchers[tower] = TowerBatcher(
                model,
                tower,
                s.max_batch_size,
                s.max_wait_ms / 1000,
                s.max_queue,
                self.metrics.observe_batch,
            )
            self.metrics.queue_depth.labels(tower).set_function(
                lambda b=self.batchers[tower]: b.depth
            )
        self.model = model
        if "text" in self.batchers:
            ids = model.prepare_texts(["warm-up"]).token_ids[0]
            self.batchers["text"].submit([ids])[0].result()
        if "vision" in self.batchers:
            pixels = model.prepare_images([np.zeros((64, 64, 3), np.uint8)]).pixels[0]
            self.batchers["vision"].submit([pixels])[0].result()
        self.ready = True
        log.info("ready: %s, %s", model.plan.backend, model.precisions)

    def healthy(self) -> bool:
        stall_after = max(30.0, 3 * self.settings.request_timeout)
        return self.ready and not any(b.stalled(stall_after) for b in self.batchers.values())

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    # ----- one request through the stages ------------------------------------------------

    def prepare(
        self, request: EmbeddingRequest
    ) -> tuple[dict[str, list], list[tuple[str, int]], int]:
        """Rows per tower, each item's (tower, row) and the usage tokens; 400 on a bad item."""
        model = self.model
        assert model is not None
        rows: dict[str, list] = {"text": [], "vision": []}
        where: list[tuple[str, int]] = []
        usage = 0
        texts = [(i, it.value) for i, it in enumerate(request.items) if it.kind == "text"]
        images = [(i, it.value) for i, it in enumerate(request.items) if it.kind == "image"]
        prepared_texts = None
        if texts:
            self._tower("text", "texts")
            prepared_texts = model.prepare_texts(
                [t for _, t in texts], request.task, self.settings.max_length
            )
            for (index, _), error, cut in zip(
                texts, prepared_texts.errors, prepared_texts.truncated, strict=True
            ):
                if error is not None:
                    raise ApiError(400, f"item {index}: {error.reason}", "input")
                if cut and not request.truncate:
                    raise ApiError(
                        400,
                        f"item {index}: longer than max_length={self.settings.max_length} "
                        "tokens; send truncate: true to embed its beginning",
                        "input",
                    )
        prepared_images = None
        if images:
            self._tower("vision", "images")
            prepared_images = model.prepare_images([v for _, v in images])
            for (index, _), error in zip(images, prepared_images.errors, strict=True):
                if error is not None:
                    raise ApiError(400, f"item {index}: {error.reason}", "input")
        text_rows = iter(prepared_texts.token_ids if prepared_texts else [])
        pixel_rows = iter(range(len(images)))
        for index, item in enumerate(request.items):
            if item.kind == "image":
                position = next(pixel_rows)
                width, height = prepared_images.sizes[position]
                usage += TOKENS_PER_TILE * math.ceil(width / TILE) * math.ceil(height / TILE)
                row = prepared_images.pixels[position]
                tower = "vision"
            else:
                row = (
                    next(text_rows)
                    if item.kind == "text"
                    else self._tokens(item.value, index, request)
                )
                usage += len(row)
                tower = "text"
            where.append((tower, len(rows[tower])))
            rows[tower].append(row)
        return rows, where, usage

    def _tower(self, tower: str, what: str) -> None:
        if tower not in self.batchers:
            raise ApiError(
                400, f"this server's bundle has no {tower} tower: it cannot embed {what}", "input"
            )

    def _tokens(self, ids: list[int], index: int, request: EmbeddingRequest) -> list[int]:
        self._tower("text", "token ids")
        tokenizer = self.model.text.tokenizer
        vocab = tokenizer.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(
                400,
                f"item {index}: token ids must be in [0, {vocab}) for this model's tokenizer",
                "input",
            )
        if len(ids) > self.settings.max_length and not request.truncate:
            raise ApiError(
                400,
                f"item {index}: {len(ids)} tokens exceed max_length={self.settings.max_length}",
                "input",
            )
        return ids[: self.settings.max_length]

    async def embed(self, request: EmbeddingRequest, deadline: float) -> dict[str, Any]:
        small = sum(len(item.value) for item in request.items if item.kind == "text") < 4096
        if small and all(item.kind != "image" for item in request.items):
            rows, where, usage = self.prepare(request)  # microseconds: no thread hop
        else:  # tokenising long texts, fetching and decoding images: off the event loop
            rows, where, usage = await run_in_threadpool(self.prepare, request)
        futures: dict[str, list] = {}
        try:
            for tower, tower_rows in rows.items():
                if tower_rows:
                    futures[tower] = self.batchers[tower].submit(tower_rows)
        except QueueFull as exc:
            for pending in futures.values():
                for future in pending:
                    future.cancel()
            raise ApiError(
                429, f"{exc}; retry shortly", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        waits = [asyncio.wrap_future(f) for pending in futures.values() for f in pending]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            for pending in futures.values():
                for future in pending:
                    future.cancel()
            raise ApiError(
                504,
                f"the request took longer than {self.settings.request_timeout} s",
                code="timeout",
            ) from None
        vectors = np.stack([futures[tower][row].result() for tower, row in where])
        vectors = truncate_and_normalize(vectors, request.dimensions, request.normalized)
        data = []
        for index, vector in enumerate(vectors):
            encoded = {name: encode(vector, name) for name in request.encodings}
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": encoded if request.keyed else encoded[request.encodings[0]],
                }
            )
        return {
            "model": self.settings.model_name,
            "object": "list",
            "data": data,
            "usage": {"total_tokens": usage, "prompt_tokens": usage},
        }


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
            route = scope["path"]
            self.metrics.latency.labels(route).observe(elapsed)
            self.metrics.requests.labels(route, str(seen["status"]), seen["error"]).inc()
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": route,
                        "status": seen["status"],
                        "ms": round(elapsed * 1000, 2),
                        "client": client[0] if client else None,
                        "error": seen["error"] or None,
                    }
                )
            )


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
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, {**exc.headers, "x-error-code": exc.code})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        error = ApiError(500, f"internal error ({type(exc).__name__}); see the server log")
        return await api_error(request, error)

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
