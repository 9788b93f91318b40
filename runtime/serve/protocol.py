"""uvicorn as the server runs it: h11 with a deadline for each request's headers, a header
size cap, a keep-alive timeout and a cap on connections (uvicorn answers 503 beyond it)."""

from __future__ import annotations

from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeSettings


class HeaderDeadline(H11Protocol):
    """Closes a connection whose request line and headers have not all arrived within
    `header_timeout` seconds of the connection (or of the previous response): a client
    trickling header bytes would otherwise hold it for ever, since every byte resets
    uvicorn's keep-alive timer."""

    header_timeout = 10.0
    _header_timer: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, settings: ServeSettings, **extra: Any) -> uvicorn.Config:
    protocol = type("ClipEdgeH11", (HeaderDeadline,), {"header_timeout": settings.header_timeout})
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=settings.max_header_bytes,
        **extra,
    )
