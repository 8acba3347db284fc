"""The worker's side of gang scheduling: hold a slot of a multi-node job, wait for the others, then
either start the job (slot 0, which publishes the rendezvous endpoint) or join it (the other slots).
The database side is `app.services.gang`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.core.config import Settings
from app.db.session import read_scope, session_scope
from app.db.tables import JobStatus
from app.services import gang, queue
from workers.distributed import advertised_host, free_port, run_member

log = logging.getLogger(__name__)


class SlotCooldown:
    """Jobs whose slot this worker gave back after waiting in vain: it leaves them alone for a while, so
    another worker (or another job) gets a turn instead of the same standoff forming again at once."""

    def __init__(self) -> None:
        self._until: dict[int, float] = {}

    def add(self, job_id: int, seconds: float) -> None:
        self._until[job_id] = time.monotonic() + seconds

    def active(self) -> list[int]:
        now = time.monotonic()
        self._until = {job: until for job, until in self._until.items() if until > now}
        return list(self._until)


def serve_slot(
    settings: Settings,
    worker_id: str,
    shutdown: threading.Event,
    cooldown: SlotCooldown,
    run_lease: Callable[[queue.Lease], JobStatus | None],
) -> bool:
    """Take a slot of a waiting multi-node job, if there is one, and see it through: wait for the gang,
    run this node's part, give the slot back. Returns whether a slot was taken."""
    with read_scope(settings) as session:
        if not gang.has_gathering_job(session):
            return False
    with session_scope(settings) as session:
        hold = gang.claim_slot(session, worker_id=worker_id, skip_jobs=cooldown.active())
    if hold is None:
        return False
    log.info("job %s: holding slot %d of %d", hold.job_id, hold.slot, hold.nodes)
    deadline = time.monotonic() + settings.gang_slot_timeout_seconds
    try:
        while not shutdown.is_set():
            lease = None
            with session_scope(settings) as session:
                state = gang.refresh_slot(session, hold)
                if hold.slot == 0 and not state.gone and state.held == hold.nodes:
                    endpoint = f"{advertised_host(settings)}:{free_port()}"
                    lease = gang.start_gang(
                        session, hold, endpoint=endpoint, fresh_seconds=settings.lease_timeout_seconds
                    )
            if state.gone:
                log.info("job %s: slot %d is no longer needed", hold.job_id, hold.slot)
                return True
            if lease is not None:
                log.info(
                    "job %s: all %d slots held; starting attempt %d", hold.job_id, hold.nodes, lease.attempt
                )
                run_lease(lease)
                return True
            if state.attempt is not None:
                log.info("job %s: joining attempt %d at %s", hold.job_id, state.attempt, state.endpoint)
                run_member(settings, hold, state, shutdown)
                return True
            if time.monotonic() > deadline:
                log.info(
                    "job %s: released slot %d after %.0f s with %d of %d slots held",
                    hold.job_id,
                    hold.slot,
                    settings.gang_slot_timeout_seconds,
                    state.held,
                    hold.nodes,
                )
                # Shorter than the wait: two workers taking turns always overlap, and then the gang starts.
                cooldown.add(hold.job_id, settings.gang_slot_timeout_seconds / 2)
                return True
            shutdown.wait(settings.worker_poll_seconds)
        return True
    finally:
        with session_scope(settings) as session:
            gang.release_slot(session, hold)
