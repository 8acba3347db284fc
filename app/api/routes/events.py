"""Following a job live: server-sent events and the worker's log lines."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import IdPath, SessionDep, SettingsDep
from app.api.event_watch import JobWatcher
from app.api.stream_slots import event_stream_slot
from app.core.config import Settings
from app.db.session import read_scope
from app.schemas.logs import JobLogLine, JobLogsRead
from app.services import events, joblogs
from app.services.jobs import get_job

router = APIRouter(prefix="/jobs", tags=["jobs"])

_EVENTS_DOC = """Server-sent events (`text/event-stream`) until the job ends:

- `status`: the job as `GET /jobs/{id}` returns it; first on every connection, then on every change;
- `progress`: the `progress` object (phase, epoch, batch, fraction, eta_seconds, images_per_second);
- `epoch`: each epoch's metrics row as it lands (as in `GET /jobs/{id}/metrics`);
- `log`: each worker log line of the job;
- `evaluation`: the test evaluation (as `GET /jobs/{id}/evaluation`);
- `end`: the final status; the server then closes the stream.

Every event has an id; reconnect with `Last-Event-ID` (header, or the `last_event_id` query parameter)
to receive only what came after it. Comment lines keep an idle connection open."""


def _poll(settings: Settings, stream: events.Stream) -> list[events.Event]:
    with read_scope(settings) as session:
        return events.poll(session, stream)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "an event stream"},
        429: {"description": "this client holds the most streams it may (Retry-After)"},
        503: {"description": "the server holds the most streams it keeps (Retry-After)"},
    },
    description=_EVENTS_DOC,
    dependencies=[Depends(event_stream_slot)],
)
async def job_events(
    job_id: IdPath,
    request: Request,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(description="Resume after this event id.")] = None,
    last_event_id_query: Annotated[
        str | None, Query(alias="last_event_id", description="The same, for clients that cannot set headers.")
    ] = None,
) -> StreamingResponse:
    """Follow a job live: status, progress, epoch rows, log lines and the evaluation, until it ends."""
    stream = events.Stream(job_id=job_id, cursor=events.Cursor.parse(last_event_id or last_event_id_query))
    # Unknown job (404) or a bad id (422) is an ordinary JSON error, before any byte is streamed.
    first = await anyio.to_thread.run_sync(_poll, settings, stream)

    watcher: JobWatcher = request.app.state.job_watcher

    async def body() -> AsyncIterator[str]:
        yield f"retry: {int(max(settings.events_poll_seconds, 1.0) * 2000)}\n\n"
        batch = first
        seen: str | None = None
        while True:
            for event in batch:
                yield event.encode()
            if stream.finished:
                return
            if not batch:  # nothing left to read: sleep until the job changes (one check serves all)
                changed = await watcher.wait_change(job_id, seen, settings.events_keepalive_seconds)
                if changed is None:
                    yield ": keepalive\n\n"
                    continue
                seen = changed
            # After a batch, read again at once: a poll sends at most 1,000 log lines.
            batch = await anyio.to_thread.run_sync(_poll, settings, stream)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{job_id}/logs", response_model=JobLogsRead)
def job_logs(
    job_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[
        int | None, Query(ge=1, description="Newest lines to return (default and maximum: the kept lines).")
    ] = None,
) -> JobLogsRead:
    """The worker's log lines for this job, newest last (at most `TRAINSERVE_JOB_LOG_MAX_LINES` are kept)."""
    job = get_job(session, job_id)
    count = min(limit or settings.job_log_max_lines, settings.job_log_max_lines)
    lines = joblogs.newest_lines(session, job_id=job_id, limit=count)
    return JobLogsRead(
        job_id=job_id, status=job.status.value, lines=[JobLogLine.model_validate(line) for line in lines]
    )
