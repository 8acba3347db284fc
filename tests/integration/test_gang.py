"""Gang scheduling in the database: slots of multi-node jobs, the start that needs every slot, the
published rendezvous endpoint, and the clean-up of slots nobody holds (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.core.config import Settings
from app.db.session import read_scope, session_scope
from app.db.tables import JobSlot, JobStatus, TrainingJob, utcnow
from app.services import gang, queue
from tests.integration.test_training_options import digits_dataset


def submit(client: TestClient, dataset_id: int, **spec: object) -> int:
    response = client.post("/jobs", json={"dataset_id": dataset_id, "model": "lenet", **spec})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def slots(settings: Settings, job_id: int) -> list[tuple[int, str, int | None, str | None]]:
    with read_scope(settings) as session:
        rows = session.scalars(select(JobSlot).where(JobSlot.job_id == job_id).order_by(JobSlot.slot)).all()
        return [(row.slot, row.worker_id, row.attempt, row.endpoint) for row in rows]


def test_a_gang_job_starts_only_when_every_slot_is_held(client: TestClient, settings: Settings) -> None:
    dataset_id = digits_dataset(client, per_class=3, classes="01")
    job_id = submit(client, dataset_id, nodes=3)
    single = submit(client, dataset_id)
    with session_scope(settings) as session:  # a plain claim skips the gang job and takes the next one
        lease = queue.claim_next_job(session, worker_id="w0")
    assert lease is not None and lease.job_id == single

    holds = []
    for worker in ("a", "b"):
        with session_scope(settings) as session:
            holds.append(gang.claim_slot(session, worker_id=worker))
    assert [(h.job_id, h.slot) for h in holds if h] == [(job_id, 0), (job_id, 1)]
    with session_scope(settings) as session:
        assert gang.claim_slot(session, worker_id="a") is None  # one slot per worker per job
        assert gang.refresh_slot(session, holds[0]).held == 2  # type: ignore[arg-type]
        assert gang.start_gang(session, holds[0], endpoint="h:1", fresh_seconds=60) is None  # type: ignore[arg-type]
    assert client.get(f"/jobs/{job_id}").json()["progress"]["nodes_held"] == 2

    with session_scope(settings) as session:
        third = gang.claim_slot(session, worker_id="c")
    assert third is not None and third.slot == 2
    with session_scope(settings) as session:
        lease = gang.start_gang(session, holds[0], endpoint="h:1234", fresh_seconds=60)  # type: ignore[arg-type]
    assert lease is not None and lease.worker_id == "a" and lease.attempt == 1
    assert slots(settings, job_id) == [(0, "a", 1, "h:1234"), (1, "b", 1, "h:1234"), (2, "c", 1, "h:1234")]
    with session_scope(settings) as session:
        state = gang.refresh_slot(session, third)
        assert gang.slot_endpoint(session, lease) == "h:1234"
    assert (state.attempt, state.endpoint, state.lease_worker_id) == (1, "h:1234", "a")
    with read_scope(settings) as session:
        assert gang.gang_workers(session, lease) == ["a", "b", "c"]
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "running" and job["progress"]["gang"] == ["a", "b", "c"]

    # The attempt ends (here: released to the queue): its slots are obsolete and get cleaned up.
    with session_scope(settings) as session:
        queue.release_job(session, lease, reason="test")
    with session_scope(settings) as session:
        assert gang.refresh_slot(session, third).gone
        assert gang.cleanup_slots(session, stale_after_seconds=60) == 3
    assert slots(settings, job_id) == []


def test_slots_of_dead_or_departed_workers_are_freed(client: TestClient, settings: Settings) -> None:
    dataset_id = digits_dataset(client, per_class=3, classes="01")
    job_id = submit(client, dataset_id, nodes=2)
    with session_scope(settings) as session:
        hold = gang.claim_slot(session, worker_id="a")
    assert hold is not None
    with session_scope(settings) as session:  # a worker that died while gathering stops refreshing
        session.execute(update(JobSlot).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
    with session_scope(settings) as session:
        assert gang.claim_slot(session, worker_id="b") is not None
        # Slot 0's holder is stale: the gang may not start with it.
        assert gang.start_gang(session, hold, endpoint="h:1", fresh_seconds=60) is None
        assert gang.cleanup_slots(session, stale_after_seconds=60) == 1
    assert [slot for slot, *_ in slots(settings, job_id)] == [1]

    with session_scope(settings) as session:  # a worker that gave up waiting
        gang.release_slot(session, gang.SlotHold(job_id=job_id, slot=1, nodes=2, worker_id="b"))
    assert slots(settings, job_id) == []
    assert client.get(f"/jobs/{job_id}").json()["progress"]["nodes_held"] == 0

    with session_scope(settings) as session:
        hold = gang.claim_slot(session, worker_id="c")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    with session_scope(settings) as session:
        assert gang.refresh_slot(session, hold).gone  # type: ignore[arg-type]
        assert gang.cleanup_slots(session, stale_after_seconds=60) == 1
        assert session.get(TrainingJob, job_id).status == JobStatus.cancelled  # type: ignore[union-attr]
