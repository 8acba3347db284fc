"""Caps on open event streams: per client address and in all, per API process.

Each `/jobs/{id}/events` stream polls the database for as long as it is open; 800 of them pushed every
other request to 3.5 s. Past `events_max_streams_per_client` a client gets 429, past `events_max_streams`
everyone gets 503, both with `Retry-After`. The slot is held by a dependency with `yield`, which FastAPI
closes after the response has been sent (the stream ended or the client went away), whatever happened.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from fastapi import HTTPException, Request

from app.core.config import Settings


class StreamSlots:
    """Counts of open streams; the event loop is single-threaded, so no lock is needed."""

    def __init__(self, *, total: int, per_client: int, retry_after_seconds: int) -> None:
        self.total = total
        self.per_client = per_client
        self.retry_after = str(retry_after_seconds)
        self.open: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamSlots:
        return cls(
            total=settings.events_max_streams,
            per_client=settings.events_max_streams_per_client,
            retry_after_seconds=settings.busy_retry_after_seconds,
        )

    def _refuse(self, status: int, detail: str) -> HTTPException:
        return HTTPException(status_code=status, detail=detail, headers={"Retry-After": self.retry_after})

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        if self.open[client] >= self.per_client:
            raise self._refuse(
                429,
                f"this client has {self.open[client]} event streams open, the most one client may "
                f"(TRAINSERVE_EVENTS_MAX_STREAMS_PER_CLIENT={self.per_client}); close one or retry later",
            )
        if self.open.total() >= self.total:
            raise self._refuse(
                503,
                f"{self.open.total()} event streams are open, the most this server keeps "
                f"(TRAINSERVE_EVENTS_MAX_STREAMS={self.total}); retry later",
            )
        self.open[client] += 1
        try:
            yield
        finally:
            self.open[client] -= 1
            if self.open[client] <= 0:
                del self.open[client]


async def event_stream_slot(request: Request) -> AsyncIterator[None]:
    """Holds one stream slot of the request's client for as long as its response lasts."""
    slots: StreamSlots = request.app.state.stream_slots
    with slots.hold(request.client.host if request.client else "unknown"):
        yield
