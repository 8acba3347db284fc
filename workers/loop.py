"""The worker process: claim a job, train it, record the outcome, take the next; stop cleanly on SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from types import FrameType

from sqlalchemy.exc import DBAPIError

from app.core.config import Settings, get_settings
from app.db.session import read_scope, session_scope
from app.db.tables import JobStatus
from app.services import gang, queue
from workers.distributed import distributed_spec, run_distributed
from workers.gang import SlotCooldown, serve_slot
from workers.joblog import JobLogCapture
from workers.memory import limit_malloc_arenas, release_free_memory
from workers.training import JobError, JobReporter, run_training

log = logging.getLogger(__name__)


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_one(lease: queue.Lease, settings: Settings, shutdown: threading.Event) -> JobStatus | None:
    """Run a claimed job to its end and record the outcome; a failure never escapes to the loop.
    Everything logged meanwhile is stored as the job's log (`GET /jobs/{id}/logs`)."""
    try:
        with JobLogCapture(lease, settings) as capture:
            return _run_captured(lease, settings, shutdown, capture)
    finally:
        release_free_memory()


def _run_captured(
    lease: queue.Lease, settings: Settings, shutdown: threading.Event, capture: JobLogCapture
) -> JobStatus | None:
    log.info("job %s: claimed by %s (attempt %d)", lease.job_id, lease.worker_id, lease.attempt)
    try:
        with JobReporter(lease, settings, shutdown) as reporter:
            spec = distributed_spec(lease, settings)  # several processes or nodes: torch.distributed
            if spec is not None:
                status, reason = run_distributed(lease, settings, reporter, spec=spec)
            else:
                status, reason = run_training(lease, settings, reporter)
    except queue.LeaseLost as exc:
        log.warning("job %s: %s; abandoning it", lease.job_id, exc)
        return None
    except JobError as exc:
        status, reason, error = JobStatus.failed, "failed", str(exc)
    except Exception as exc:
        log.error("job %s failed:\n%s", lease.job_id, traceback.format_exc())
        status, reason, error = JobStatus.failed, "failed", f"{type(exc).__name__}: {exc}"
    else:
        error = None

    log.info("job %s: ending %s (%s)%s", lease.job_id, status.value, reason, f": {error}" if error else "")
    capture.flush()  # the job's log is complete before its final status is visible
    try:
        with session_scope(settings) as session:
            if status == JobStatus.queued:
                queue.release_job(session, lease, reason=reason)
            else:
                queue.finish_job(session, lease, status=status, stop_reason=reason, error=error)
    except queue.LeaseLost as exc:
        log.warning("job %s: %s; its outcome (%s) was not recorded", lease.job_id, exc, status.value)
        return None
    return status


def claim(settings: Settings, worker_id: str, *, recover_stale: bool = True) -> queue.Lease | None:
    """Claim the oldest queued job. An idle worker polls with a read (no SQLite write lock) and takes
    the write lock only when there is something to claim."""
    if recover_stale:
        with session_scope(settings) as session:
            queue.requeue_stale_jobs(
                session,
                lease_timeout_seconds=settings.lease_timeout_seconds,
                max_attempts=settings.max_attempts,
            )
            gang.cleanup_slots(session, stale_after_seconds=settings.lease_timeout_seconds)
    with read_scope(settings) as session:
        if not queue.has_queued_job(session):
            return None
    with session_scope(settings) as session:
        return queue.claim_next_job(session, worker_id=worker_id)


def serve(settings: Settings, *, once: bool = False, shutdown: threading.Event | None = None) -> int:
    """Process jobs until shut down (or, with `once`, until one job is done or none is queued)."""
    shutdown = shutdown or threading.Event()
    worker_id = make_worker_id()
    log.info("worker %s serving %s", worker_id, settings.database_url.split("@")[-1])
    last_recovery = float("-inf")
    database_ready = True
    cooldown = SlotCooldown()
    while not shutdown.is_set():
        # Looking for stale jobs takes a write lock: do it once per heartbeat interval, not every poll.
        recover = time.monotonic() - last_recovery >= settings.heartbeat_seconds
        if recover:
            last_recovery = time.monotonic()
        try:
            lease = claim(settings, worker_id, recover_stale=recover)
        except DBAPIError as exc:
            # The database may not be up or migrated yet: containers start together, and not every tool
            # waits for the API's migrations (podman-compose with Podman < 4.6 ignores the health
            # condition). A serving worker waits for it rather than exit; the error is logged once per
            # outage. SQLite "database is locked" (a long upload holding the write lock) is waited out too;
            # a run-once worker (scripts, tests) fails at once on anything else.
            if once and "locked" not in str(exc.orig).lower():
                raise
            if database_ready:
                log.warning(
                    "worker %s: database not ready, retrying: %s", worker_id, str(exc).splitlines()[0]
                )
            database_ready = False
            last_recovery = float("-inf")
            shutdown.wait(settings.worker_poll_seconds)
            continue
        if not database_ready:
            log.info("worker %s: database ready", worker_id)
            database_ready = True
        if lease is None and serve_slot(
            settings, worker_id, shutdown, cooldown, lambda lease: run_one(lease, settings, shutdown)
        ):
            if once:
                return 0
            continue  # multi-node jobs: a slot was held (and the job run, or the slot given back)
        if lease is None:
            if once:
                return 0
            shutdown.wait(settings.worker_poll_seconds)
            continue
        run_one(lease, settings, shutdown)
        if once:
            return 0
    log.info("worker %s stopped", worker_id)
    return 0


def install_signal_handlers(shutdown: threading.Event) -> None:
    """First SIGTERM/SIGINT: finish the current batch, requeue the job, exit. A second: exit now."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        if shutdown.is_set():
            raise SystemExit(128 + signum)
        log.info("worker got signal %d; stopping after the current batch", signum)
        shutdown.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from app.core.logging import configure_logging

    parser = argparse.ArgumentParser(prog="trainserve worker", description="Run a training worker.")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    limit_malloc_arenas(settings.worker_malloc_arenas)
    shutdown = threading.Event()
    install_signal_handlers(shutdown)
    return serve(settings, once=args.once, shutdown=shutdown)
