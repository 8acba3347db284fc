"""The command-line client's event reader: the SSE format, and reconnecting with Last-Event-ID."""

from __future__ import annotations

import httpx
import pytest

from app.client import api
from app.client.api import ApiError, TrainserveClient, parse_event_stream


def test_parser_handles_comments_multiline_data_and_plain_text() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keepalive",
        "",
        "id: 1-0-0-0",
        "event: status",
        'data: {"a":',
        "data: 1}",
        "",
        "data: plain",
        "",
    ]
    events = list(parse_event_stream(iter(lines)))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("status", {"a": 1}, "1-0-0-0"),
        ("message", "plain", "1-0-0-0"),
    ]


def test_events_reconnect_after_a_drop_with_the_last_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.time, "sleep", lambda _s: None)
    seen_ids: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ids.append(request.headers.get("last-event-id"))
        if len(seen_ids) == 1:  # the first connection ends without `end`, as when a proxy cuts it
            body = 'id: 1-0-1-0\nevent: epoch\ndata: {"epoch": 1}\n\n'
        elif len(seen_ids) == 2:
            raise httpx.ReadError("connection reset")
        else:
            body = 'id: 2-0-1-0\nevent: epoch\ndata: {"epoch": 2}\n\nid: 2-0-1-1\nevent: end\ndata: {}\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    client = TrainserveClient("http://trainserve.test")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    events = list(client.events(7))
    assert [e.event for e in events] == ["epoch", "epoch", "end"]
    assert seen_ids == [None, "1-0-1-0", "1-0-1-0"]


def test_events_of_an_unknown_job_raise_the_servers_words() -> None:
    def handler(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "job 7 not found"})

    client = TrainserveClient("http://trainserve.test")
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError, match="404: job 7 not found"):
        list(client.events(7))
