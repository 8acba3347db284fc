"""A job's server-sent events, computed from the database alone (the API and workers share nothing else).

Each event's id is the stream's *cursor* after that event, `<epoch>-<log>-<seq>-<evaluation>`:

- `epoch`: the last epoch row sent (rows are unique per job and epoch, and only ever appended);
- `log`: the id of the last job log line sent (ids only grow);
- `seq`: the job's `progress.seq` last sent (every progress write increases it);
- `evaluation`: 1 once the test evaluation was sent.

Every part only grows along a stream, so a client that reconnects with `Last-Event-ID` gets exactly
what it has not seen: later epochs, later log lines, newer progress, and the evaluation if it missed it.
Status is a state, not a history: a (re)connected stream always starts with the current `status`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import Invalid
from app.db.tables import FINISHED_STATUSES, EpochMetric, Evaluation, JobLog, TrainingJob
from app.schemas.jobs import EpochMetricRead
from app.services import joblogs
from app.services.jobs import get_job, job_evaluation, job_read

_CURSOR = re.compile(r"^(\d{1,9})-(\d{1,18})-(\d{1,18})-([01])$")


@dataclass
class Cursor:
    epoch: int = 0
    log: int = 0
    seq: int = 0
    evaluation: int = 0

    def __str__(self) -> str:
        return f"{self.epoch}-{self.log}-{self.seq}-{self.evaluation}"

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        """A cursor from a `Last-Event-ID`; empty means from the start."""
        if value is None or not value.strip():
            return cls()
        match = _CURSOR.match(value.strip())
        if match is None:
            raise Invalid(
                f"Last-Event-ID {value[:60]!r} is not an event id of this stream "
                "(expected <epoch>-<log>-<seq>-<evaluation>, e.g. 3-120-45-0)"
            )
        return cls(*(int(part) for part in match.groups()))


@dataclass(frozen=True)
class Event:
    name: str
    data: Any
    id: str

    def encode(self) -> str:
        payload = json.dumps(self.data, separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.name}\ndata: {payload}\n\n"


@dataclass
class Stream:
    """What one connection has sent so far; `poll` advances it."""

    job_id: int
    cursor: Cursor = field(default_factory=Cursor)
    status_signature: str | None = None
    finished: bool = False


def poll(session: Session, stream: Stream, *, log_limit: int = 1000) -> list[Event]:
    """The events that happened since `stream.cursor`; sets `stream.finished` after the final one.

    The job row is read first: when it says the job has ended, the rows and log lines read after it
    include everything the worker wrote before ending it, so nothing can land after `end`.
    """
    events: list[Event] = []
    cursor = stream.cursor

    def emit(name: str, data: Any) -> None:
        events.append(Event(name=name, data=data, id=str(cursor)))

    job = get_job(session, stream.job_id)
    read = job_read(job).model_dump(mode="json")
    finished = job.status in FINISHED_STATUSES

    signature = json.dumps({k: v for k, v in read.items() if k != "progress"}, sort_keys=True, default=str)
    if signature != stream.status_signature:
        stream.status_signature = signature
        emit("status", read)

    rows = session.scalars(
        select(EpochMetric)
        .where(EpochMetric.job_id == job.id, EpochMetric.epoch > cursor.epoch)
        .order_by(EpochMetric.epoch)
    ).all()
    for row in rows:
        cursor.epoch = row.epoch
        emit("epoch", EpochMetricRead.model_validate(row).model_dump(mode="json"))

    lines = joblogs.lines_after(session, job_id=job.id, after_id=cursor.log, limit=log_limit)
    for line in lines:
        cursor.log = line.id
        emit(
            "log",
            {
                "id": line.id,
                "attempt": line.attempt,
                "level": line.level,
                "logger": line.logger,
                "message": line.message,
                "created_at": line.created_at.isoformat(),
            },
        )

    progress = job.progress or {}
    seq = int(progress.get("seq", 0))
    if seq > cursor.seq:
        cursor.seq = seq
        emit("progress", {**progress, "status": job.status.value})

    if not cursor.evaluation and session.get(Evaluation, job.id) is not None:
        cursor.evaluation = 1
        emit("evaluation", job_evaluation(session, job.id).model_dump(mode="json"))

    if finished and len(lines) < log_limit:
        stream.finished = True
        emit("end", {"status": job.status.value, "stop_reason": job.stop_reason, "error": job.error})
    return events


def fingerprints(session: Session, job_ids: list[int]) -> dict[int, str]:
    """For each job, a string that changes whenever `poll` could find something new: the job as read,
    its newest epoch row and log line, and whether it has an evaluation. Four queries for any number
    of jobs, so one check serves every open stream (a job that is gone has no entry)."""
    jobs = session.scalars(select(TrainingJob).where(TrainingJob.id.in_(job_ids))).all()
    epochs: dict[int, int] = {
        job_id: epoch
        for job_id, epoch in session.execute(
            select(EpochMetric.job_id, func.max(EpochMetric.epoch))
            .where(EpochMetric.job_id.in_(job_ids))
            .group_by(EpochMetric.job_id)
        )
    }
    logs: dict[int, int] = {
        job_id: line
        for job_id, line in session.execute(
            select(JobLog.job_id, func.max(JobLog.id))
            .where(JobLog.job_id.in_(job_ids))
            .group_by(JobLog.job_id)
        )
    }
    evaluated = set(session.scalars(select(Evaluation.job_id).where(Evaluation.job_id.in_(job_ids))))
    return {
        job.id: json.dumps(
            [
                job_read(job).model_dump(mode="json"),
                epochs.get(job.id),
                logs.get(job.id),
                job.id in evaluated,
            ],
            sort_keys=True,
            default=str,
        )
        for job in jobs
    }
