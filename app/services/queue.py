"""The job queue as the workers see it: atomic claims, heartbeats, and fenced result writes.

Every write a worker makes goes through `_owned_job`, which checks in the same transaction that the
job is still running under this worker's claim (`worker_id` and `attempts` form the fencing token).
A worker that lost its lease gets `LeaseLost` instead of overwriting its successor's work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, undefer

from app.db.tables import (
    Checkpoint,
    CheckpointKind,
    EpochMetric,
    Evaluation,
    JobStatus,
    TrainingJob,
    utcnow,
)


class LeaseLost(RuntimeError):
    """The job is no longer this worker's: cancelled, finished, or taken over after a stale heartbeat."""


@dataclass(frozen=True)
class Lease:
    job_id: int
    worker_id: str
    attempt: int


def requeue_stale_jobs(session: Session, *, lease_timeout_seconds: float, max_attempts: int) -> int:
    """Return running jobs whose worker stopped heartbeating to the queue (or fail them when out of tries)."""
    cutoff = utcnow() - timedelta(seconds=lease_timeout_seconds)
    stale = session.scalars(
        select(TrainingJob)
        .where(TrainingJob.status == JobStatus.running, TrainingJob.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)
    ).all()
    for job in stale:
        lost = f"worker {job.worker_id} stopped heartbeating"
        if job.attempts >= max_attempts:
            job.status = JobStatus.failed
            job.error = f"{lost}; gave up after {job.attempts} attempts"
            job.finished_at = utcnow()
        else:
            job.status = JobStatus.queued
            job.progress = {**(job.progress or {}), "phase": "queued", "requeued_because": lost}
        job.worker_id = None
    return len(stale)


def has_queued_job(session: Session) -> bool:
    return (
        session.scalar(select(TrainingJob.id).where(TrainingJob.status == JobStatus.queued).limit(1))
        is not None
    )


def claim_next_job(session: Session, *, worker_id: str) -> Lease | None:
    """Take the oldest queued single-node job (multi-node jobs start through `app.services.gang`).
    On PostgreSQL, SKIP LOCKED lets many workers claim concurrently; SQLite's BEGIN IMMEDIATE (see
    app.db.engine) serialises claimers instead."""
    job = session.scalar(
        select(TrainingJob)
        .where(TrainingJob.status == JobStatus.queued, TrainingJob.nodes <= 1)
        .order_by(TrainingJob.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if job is None:
        return None
    now = utcnow()
    job.status = JobStatus.running
    job.attempts += 1
    job.worker_id = worker_id
    job.heartbeat_at = now
    job.started_at = job.started_at or now
    job.progress = {**(job.progress or {}), "phase": "starting"}
    session.flush()
    return Lease(job_id=job.id, worker_id=worker_id, attempt=job.attempts)


def _owned_job(session: Session, lease: Lease) -> TrainingJob:
    job = session.scalar(select(TrainingJob).where(TrainingJob.id == lease.job_id).with_for_update())
    if (
        job is None
        or job.status != JobStatus.running
        or job.worker_id != lease.worker_id
        or job.attempts != lease.attempt
    ):
        raise LeaseLost(
            f"job {lease.job_id} is no longer held by {lease.worker_id} (attempt {lease.attempt})"
        )
    return job


def heartbeat(session: Session, lease: Lease, *, progress: dict[str, Any] | None = None) -> bool:
    """Refresh the lease (and progress); returns True when a cancel was requested. Every progress
    write increases `progress.seq`, which event streams use to resume without missing an update."""
    job = _owned_job(session, lease)
    job.heartbeat_at = utcnow()
    if progress is not None:
        job.progress = {**progress, "seq": int((job.progress or {}).get("seq", 0)) + 1}
    return job.cancel_requested


def last_checkpoint(session: Session, job_id: int) -> Checkpoint | None:
    """The resumable state stored after the job's last finished epoch, if any."""
    return session.scalar(
        select(Checkpoint)
        .options(undefer(Checkpoint.weights))
        .where(Checkpoint.job_id == job_id, Checkpoint.kind == CheckpointKind.last)
    )


def start_attempt(
    session: Session,
    lease: Lease,
    *,
    classes: list[str],
    split_sizes: dict[str, int],
    resume_epoch: int = 0,
) -> None:
    """Record what the job trains on. A fresh start drops an earlier attempt's results; a resumed one
    keeps epochs 1..resume_epoch and the best checkpoint so far, and drops anything after."""
    job = _owned_job(session, lease)
    job.classes = classes
    job.split_sizes = split_sizes
    session.execute(
        delete(EpochMetric).where(EpochMetric.job_id == lease.job_id, EpochMetric.epoch > resume_epoch)
    )
    session.execute(delete(Evaluation).where(Evaluation.job_id == lease.job_id))
    if resume_epoch == 0:
        job.best_epoch = job.best_metric = job.best_value = None
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == lease.job_id))


def set_job_info(session: Session, lease: Lease, *, info: dict[str, Any]) -> None:
    _owned_job(session, lease).info = info


def record_epoch(session: Session, lease: Lease, *, values: dict[str, Any]) -> None:
    _owned_job(session, lease).heartbeat_at = utcnow()
    session.add(EpochMetric(job_id=lease.job_id, **values))


def store_checkpoint(
    session: Session,
    lease: Lease,
    *,
    kind: CheckpointKind,
    epoch: int,
    metric: str | None,
    value: float | None,
    meta: dict[str, Any],
    weights: bytes,
) -> None:
    """Replace the job's checkpoint of this kind; a best checkpoint also updates the job's `best`."""
    job = _owned_job(session, lease)
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == lease.job_id, Checkpoint.kind == kind))
    session.add(
        Checkpoint(
            job_id=lease.job_id,
            kind=kind,
            epoch=epoch,
            metric=metric,
            value=value,
            meta=meta,
            weights=weights,
            size_bytes=len(weights),
        )
    )
    if kind == CheckpointKind.best:
        job.best_epoch, job.best_metric, job.best_value = epoch, metric, value


def store_evaluation(session: Session, lease: Lease, *, values: dict[str, Any]) -> None:
    _owned_job(session, lease)
    session.execute(delete(Evaluation).where(Evaluation.job_id == lease.job_id))
    session.add(Evaluation(job_id=lease.job_id, **values))


def finish_job(
    session: Session,
    lease: Lease,
    *,
    status: JobStatus,
    stop_reason: str | None = None,
    error: str | None = None,
) -> None:
    job = _owned_job(session, lease)
    job.status = status
    job.stop_reason = stop_reason
    job.error = error
    job.finished_at = utcnow()
    # The resumable state has served its purpose once the job is over; the best checkpoint stays.
    session.execute(
        delete(Checkpoint).where(Checkpoint.job_id == lease.job_id, Checkpoint.kind == CheckpointKind.last)
    )
    job.progress = {**(job.progress or {}), "phase": status.value}


def release_job(session: Session, lease: Lease, *, reason: str) -> None:
    """Put a job this worker holds back in the queue (worker shutting down)."""
    job = _owned_job(session, lease)
    job.status = JobStatus.queued
    job.worker_id = None
    job.progress = {**(job.progress or {}), "phase": "queued", "requeued_because": reason}
