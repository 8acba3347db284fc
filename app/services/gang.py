"""Gang scheduling of multi-node jobs through the database.

A job with `nodes: N` is not claimed by one worker: N workers each take one of its slots (`JobSlot`).
The holder of slot 0 starts the job once all N slots are held by live workers, in one transaction that
marks the job running (a new attempt, fenced like any lease) and stamps every slot with that attempt and
the rendezvous endpoint slot 0 publishes; the other holders see the stamp and join. A holder that waits
longer than `gang_slot_timeout_seconds` gives its slot back, so two half-gathered jobs never hold each
other's workers forever; workers also gather the oldest job first, which avoids most such standoffs.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db.tables import JobSlot, JobStatus, TrainingJob, utcnow
from app.services.queue import Lease


@dataclass(frozen=True)
class SlotHold:
    """This worker's slot in a multi-node job's gang."""

    job_id: int
    slot: int
    nodes: int
    worker_id: str


@dataclass(frozen=True)
class GangState:
    """What a slot holder sees when it refreshes its slot."""

    held: int  # slots held (by live workers) while the gang gathers
    gone: bool = False  # the slot was taken away: the job was cancelled, finished or reset
    attempt: int | None = None  # set once slot 0 has started the job
    endpoint: str | None = None
    lease_worker_id: str | None = None  # the slot-0 worker, whose lease the ranks' writes use


def _set_gathering_progress(session: Session, job: TrainingJob) -> None:
    held = session.scalar(select(func.count()).select_from(JobSlot).where(JobSlot.job_id == job.id)) or 0
    job.progress = {**(job.progress or {}), "phase": "gathering", "nodes_held": held, "nodes": job.nodes}


def has_gathering_job(session: Session) -> bool:
    """Whether a multi-node job waits for workers (a plain read: idle workers poll without a write lock)."""
    query = select(TrainingJob.id).where(TrainingJob.status == JobStatus.queued, TrainingJob.nodes > 1)
    return session.scalar(query.limit(1)) is not None


def claim_slot(session: Session, *, worker_id: str, skip_jobs: Collection[int] = ()) -> SlotHold | None:
    """Take the lowest free slot of the oldest queued multi-node job that has one."""
    query = (
        select(TrainingJob)
        .where(TrainingJob.status == JobStatus.queued, TrainingJob.nodes > 1)
        .order_by(TrainingJob.id)
        .limit(20)
    )
    if skip_jobs:
        query = query.where(TrainingJob.id.not_in(list(skip_jobs)))
    # FOR UPDATE without SKIP LOCKED: a second claimer waits for the first and then takes the next slot,
    # instead of skipping the job that is gathering.
    for job in session.scalars(query.with_for_update()).all():
        rows = session.scalars(select(JobSlot).where(JobSlot.job_id == job.id)).all()
        if any(row.worker_id == worker_id for row in rows):
            continue
        taken = {row.slot for row in rows}
        free = [slot for slot in range(job.nodes) if slot not in taken]
        if not free:
            continue
        now = utcnow()
        session.add(
            JobSlot(job_id=job.id, slot=free[0], worker_id=worker_id, claimed_at=now, heartbeat_at=now)
        )
        session.flush()
        _set_gathering_progress(session, job)
        return SlotHold(job_id=job.id, slot=free[0], nodes=job.nodes, worker_id=worker_id)
    return None


def refresh_slot(session: Session, hold: SlotHold) -> GangState:
    """Heartbeat this worker's slot and report the gang: how many slots are held, or the started attempt."""
    row = session.get(JobSlot, (hold.job_id, hold.slot), with_for_update=True)
    job = session.get(TrainingJob, hold.job_id)
    if row is None or row.worker_id != hold.worker_id or job is None:
        return GangState(held=0, gone=True)
    if row.attempt is not None:
        if job.status != JobStatus.running or job.attempts != row.attempt:
            return GangState(held=0, gone=True)
        return GangState(
            held=job.nodes, attempt=row.attempt, endpoint=row.endpoint, lease_worker_id=job.worker_id
        )
    if job.status != JobStatus.queued:
        return GangState(held=0, gone=True)
    row.heartbeat_at = utcnow()
    held = session.scalar(
        select(func.count())
        .select_from(JobSlot)
        .where(JobSlot.job_id == hold.job_id, JobSlot.attempt.is_(None))
    )
    return GangState(held=int(held or 0))


def start_gang(session: Session, hold: SlotHold, *, endpoint: str, fresh_seconds: float) -> Lease | None:
    """Slot 0 only: when every slot is held by a worker seen within `fresh_seconds`, mark the job running
    (a new attempt, this worker's lease) and publish `endpoint` to every slot. None while still gathering."""
    if hold.slot != 0:
        raise ValueError("only the holder of slot 0 starts a gang")
    job = session.scalar(select(TrainingJob).where(TrainingJob.id == hold.job_id).with_for_update())
    if job is None or job.status != JobStatus.queued:
        return None
    cutoff = utcnow() - timedelta(seconds=fresh_seconds)
    rows = session.scalars(select(JobSlot).where(JobSlot.job_id == hold.job_id)).all()
    live = [row for row in rows if row.attempt is None and row.heartbeat_at >= cutoff]
    if sorted(row.slot for row in live) != list(range(job.nodes)):
        return None
    if next(row for row in live if row.slot == 0).worker_id != hold.worker_id:
        return None
    now = utcnow()
    job.status = JobStatus.running
    job.attempts += 1
    job.worker_id = hold.worker_id
    job.heartbeat_at = now
    job.started_at = job.started_at or now
    job.progress = {
        **(job.progress or {}),
        "phase": "starting",
        "gang": [row.worker_id for row in sorted(live, key=lambda row: row.slot)],
    }
    for row in live:
        row.attempt = job.attempts
        row.endpoint = endpoint
    session.flush()
    return Lease(job_id=job.id, worker_id=hold.worker_id, attempt=job.attempts)


def slot_endpoint(session: Session, lease: Lease) -> str | None:
    """The rendezvous endpoint published for this lease's attempt (None for a single-node job)."""
    return session.scalar(
        select(JobSlot.endpoint).where(
            JobSlot.job_id == lease.job_id, JobSlot.slot == 0, JobSlot.attempt == lease.attempt
        )
    )


def gang_workers(session: Session, lease: Lease) -> list[str]:
    """The workers of this lease's attempt, in slot order (slot 0 first)."""
    query = (
        select(JobSlot.worker_id)
        .where(JobSlot.job_id == lease.job_id, JobSlot.attempt == lease.attempt)
        .order_by(JobSlot.slot)
    )
    return list(session.scalars(query))


def release_slot(session: Session, hold: SlotHold) -> None:
    """Give this worker's slot back (waited too long, shutting down, or its part of the job is over)."""
    session.execute(
        delete(JobSlot).where(
            JobSlot.job_id == hold.job_id, JobSlot.slot == hold.slot, JobSlot.worker_id == hold.worker_id
        )
    )
    job = session.get(TrainingJob, hold.job_id)
    if job is not None and job.status == JobStatus.queued:
        _set_gathering_progress(session, job)


def cleanup_slots(session: Session, *, stale_after_seconds: float) -> int:
    """Drop slots nobody holds any more: gathering slots whose worker stopped refreshing them, slots of
    jobs that are no longer queued, and started slots whose attempt is over. Returns how many."""
    cutoff = utcnow() - timedelta(seconds=stale_after_seconds)
    rows = session.execute(
        select(JobSlot, TrainingJob.status, TrainingJob.attempts).join(
            TrainingJob, TrainingJob.id == JobSlot.job_id
        )
    ).all()
    dropped = 0
    for row, status, attempts in rows:
        if row.attempt is None:
            obsolete = status != JobStatus.queued or row.heartbeat_at < cutoff
        else:
            obsolete = status != JobStatus.running or attempts != row.attempt
        if obsolete:
            session.delete(row)
            dropped += 1
    return dropped
