"""The request and response schema for /openapi.json and /docs only: the route itself reads
the raw body (`requests.py`), so these pydantic models cost nothing per request."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

Encoding = Literal["float", "base64", "binary", "ubinary"]


class TextItem(BaseModel):
    text: str


class ImageItem(BaseModel):
    image: str = Field(description="an http(s) URL (with --allow-urls), base64 or a data URI")


class UrlItem(BaseModel):
    url: str = Field(description="an http(s) image URL (with --allow-urls)")


class BytesItem(BaseModel):
    bytes: str = Field(description="an encoded image as base64")


Item = str | TextItem | ImageItem | UrlItem | BytesItem | list[int]


class EmbeddingRequest(BaseModel):
    """The Jina and the OpenAI embeddings request."""

    model: str = "jina-clip-v2"
    input: str | list[int] | list[Item] = Field(description="texts, images or token ids")
    dimensions: int | str | None = Field(None, description="Matryoshka truncation")
    normalized: bool = True
    task: str | None = Field(None, description="e.g. retrieval.query")
    truncate: bool = Field(False, description="embed the beginning of over-long texts")
    embedding_type: Encoding | list[Encoding] | None = None
    encoding_type: Encoding | list[Encoding] | None = None
    encoding_format: Encoding | None = None
    user: str | None = Field(None, description="ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str | dict[str, list[float] | list[int] | str]


class Usage(BaseModel):
    total_tokens: int
    prompt_tokens: int


class EmbeddingResponse(BaseModel):
    model: str
    object: Literal["list"] = "list"
    data: list[Embedding]
    usage: Usage
    warnings: list[str] | None = Field(None, description="e.g. off-Matryoshka dimensions")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
    detail: str


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 503, 504)}
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}
        },
    }
}


def openapi(app: Any) -> dict[str, Any]:
    """FastAPI's schema with the request model added (the route reads the body itself)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        request = EmbeddingRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(request.pop("$defs", {}))
        schemas["EmbeddingRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema
