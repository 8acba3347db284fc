"""Time limits for slow clients: the request head must arrive within `header_read_timeout_seconds`,
and while a body streams in, no gap between two of its chunks may exceed `body_read_timeout_seconds`.

uvicorn has neither: a connection that sends nothing, or one header byte every few seconds (slowloris),
holds its socket and its slot for ever, and so does a body that stalls halfway. The head is timed in
the HTTP protocol (the app is only called once the head is complete); the body in the ASGI layer
(`BodyLimitMiddleware` wraps `receive` with `body_chunk_timeout`). Both answer 408 and close.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.core.config import get_settings


class BodyTimeout(HTTPException):
    """Raised from `receive` like `BodyTooLarge`; FastAPI renders it, and the connection is closed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            status_code=408,
            detail=f"request body stalled: no bytes for {seconds:g} s (TRAINSERVE_BODY_READ_TIMEOUT_SECONDS)",
            headers={"Connection": "close"},
        )


async def body_chunk_timeout(receive: Receive, seconds: float) -> Message:
    """The next message, refused with BodyTimeout when the client sends nothing for `seconds`."""
    try:
        with anyio.fail_after(seconds):
            return await receive()
    except TimeoutError:
        raise BodyTimeout(seconds) from None


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(
        {"detail": f"request head not received within {seconds:g} s (TRAINSERVE_HEADER_READ_TIMEOUT_SECONDS)"}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for each request head: armed when the connection
    opens (the protocol is made for it) and when a new request begins on a kept-alive one, disarmed
    when the head is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = get_settings().header_read_timeout_seconds
        self._head_deadline: asyncio.TimerHandle | None = None
        # uvicorn makes one protocol per connection, just before `connection_made`: the clock starts now.
        self._arm()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response(self.header_timeout))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
