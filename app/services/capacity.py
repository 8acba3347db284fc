"""Refusing at submit a job that no worker could ever run, so it never waits in the queue forever.

A job asks for `devices` processes on each of `nodes` workers. What can be served comes from two places:

- the operator's settings `max_job_devices` and `max_job_nodes`, which always cap a spec when set;
- the `worker_capacity` rows live workers keep fresh (a heartbeat within the lease timeout): a job
  needs `nodes` of them that can each run `devices` processes.

With no worker registered yet the settings alone decide, and `max_job_devices` then defaults to this
machine's CPU count (the `trainserve up` case: API and workers on one machine), so `devices: 64` on a
2-core host is refused instead of starting 64 processes.
"""

from __future__ import annotations

import os
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Invalid
from app.db.tables import WorkerCapacity, utcnow
from app.schemas.jobs import JobSpec


def live_workers(session: Session, settings: Settings) -> list[WorkerCapacity]:
    """Workers whose capacity row was refreshed within the lease timeout."""
    since = utcnow() - timedelta(seconds=settings.lease_timeout_seconds)
    return list(session.scalars(select(WorkerCapacity).where(WorkerCapacity.heartbeat_at >= since)))


def check_job_fits(session: Session, *, spec: JobSpec, settings: Settings) -> None:
    """Raise Invalid (422) naming what is missing when no set of workers could ever run `spec`."""
    devices = spec.devices if isinstance(spec.devices, int) else None  # `auto` fits every worker
    if settings.max_job_nodes is not None and spec.nodes > settings.max_job_nodes:
        raise Invalid(
            f"nodes: {spec.nodes} nodes asked for, at most {settings.max_job_nodes} can be served "
            "(TRAINSERVE_MAX_JOB_NODES)"
        )
    workers = live_workers(session, settings)
    device_cap = settings.max_job_devices
    if device_cap is None and not workers:
        device_cap = os.cpu_count() or 1
    if devices is not None and device_cap is not None and devices > device_cap:
        where = (
            "TRAINSERVE_MAX_JOB_DEVICES" if settings.max_job_devices is not None else "this machine's CPUs"
        )
        raise Invalid(
            f"devices: {devices} processes per node asked for, at most {device_cap} can be served ({where})"
        )
    if not workers:
        return
    able = [w for w in workers if devices is None or w.max_devices >= devices]
    if len(able) < spec.nodes:
        largest = max(workers, key=lambda w: w.max_devices)
        raise Invalid(
            f"devices x nodes: {spec.devices} x {spec.nodes} cannot be served: {len(able)} of the "
            f"{len(workers)} live workers can run {spec.devices} processes (the largest runs "
            f"{largest.max_devices}, on {largest.host})"
        )
