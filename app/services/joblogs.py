"""Job log lines: the worker appends them in batches, the API reads the newest ones."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from app.db.tables import JobLog


@dataclass(frozen=True)
class LogLine:
    """One captured record, ready to insert."""

    created_at: datetime
    level: str
    logger: str
    message: str


def append_lines(session: Session, *, job_id: int, attempt: int, lines: list[LogLine], keep: int) -> None:
    """Insert `lines` in one statement, then drop the job's oldest lines beyond `keep`."""
    if not lines:
        return
    session.execute(
        insert(JobLog),
        [
            {
                "job_id": job_id,
                "attempt": attempt,
                "level": line.level,
                "logger": line.logger[:200],
                "message": line.message,
                "created_at": line.created_at,
            }
            for line in lines
        ],
    )
    # The id of the oldest line still kept; everything older goes (one indexed range delete).
    oldest_kept = session.scalar(
        select(JobLog.id).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).offset(keep - 1).limit(1)
    )
    if oldest_kept is not None:
        session.execute(delete(JobLog).where(JobLog.job_id == job_id, JobLog.id < oldest_kept))


def newest_lines(session: Session, *, job_id: int, limit: int) -> list[JobLog]:
    """The job's newest `limit` lines, oldest first (newest last)."""
    rows = session.scalars(
        select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).limit(limit)
    ).all()
    return list(reversed(rows))


def lines_after(session: Session, *, job_id: int, after_id: int, limit: int) -> list[JobLog]:
    """Lines with an id above `after_id`, oldest first (what an events stream has not sent yet)."""
    return list(
        session.scalars(
            select(JobLog)
            .where(JobLog.job_id == job_id, JobLog.id > after_id)
            .order_by(JobLog.id)
            .limit(limit)
        )
    )
