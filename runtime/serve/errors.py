"""API errors in the JSON shape both the OpenAI and the Jina clients read."""

from __future__ import annotations

from typing import Any

from clipedge.errors import ClipEdgeError, EngineLimitError, InputError, OptionError

ERROR_TYPES = {
    400: "invalid_request_error",
    405: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered as `{"error": {message, type, param, code}, "detail": message}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            },
            "detail": self.message,
        }


def api_error(exc: ClipEdgeError, index: int | None = None) -> ApiError:
    """The one mapping from clipedge's errors to HTTP: a bad option or item is the client's
    (400; 413 for an item larger than the engine takes), a bundle or engine failure the
    server's (500). `index` re-bases an item's error on the request's own numbering."""
    reason = getattr(exc, "reason", None)
    message = str(exc) if index is None or reason is None else f"item {index}: {reason}"
    if isinstance(exc, InputError):
        return ApiError(413 if isinstance(exc, EngineLimitError) else 400, message, "input")
    if isinstance(exc, OptionError):
        return ApiError(400, message)
    return ApiError(500, message)
