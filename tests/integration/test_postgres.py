"""The API and the job queue on PostgreSQL, and the queue's concurrency guarantees on both databases.

The `postgres` cases skip unless TRAINSERVE_TEST_DATABASE_URL is set (CI sets it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.session import session_scope
from app.db.tables import Checkpoint, CheckpointKind, EpochMetric, Evaluation, Image, JobStatus, TrainingJob
from app.db.tables import utcnow as now
from app.main import create_app
from app.schemas.datasets import DatasetCreate
from app.schemas.jobs import JobSpec
from app.services import queue
from app.services.datasets import class_counts, create_dataset
from app.services.images import Upload, add_uploads
from app.services.jobs import create_job
from tests.conftest import make_settings
from tests.factories import noise_png

LEASE_TIMEOUT = 60.0
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_settings(request: pytest.FixtureRequest) -> Settings:
    """Settings over a migrated database: a SQLite file, or a fresh PostgreSQL database."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    return make_settings(str(url), lease_timeout_seconds=LEASE_TIMEOUT, max_attempts=3)


@pytest.fixture
def pg_client(postgres_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(postgres_url))) as client:
        yield client


# --- helpers -----------------------------------------------------------------------------------------


def make_dataset(settings: Settings, *, per_class: int = 2) -> int:
    """A dataset with two classes, built through the services the API uses."""
    with session_scope(settings) as session:
        dataset_id = create_dataset(session, dataset_create=DatasetCreate(name="queue")).id
        pairs = [(label, i) for label in ("a", "b") for i in range(per_class)]
        uploads = [
            Upload(filename=f"{label}-{i}.png", label=label, data=noise_png(seed))
            for seed, (label, i) in enumerate(pairs)
        ]
        add_uploads(session, dataset_id=dataset_id, uploads=uploads)
        # What was stored, not what add_uploads reported: the queue tests need only the rows.
        assert class_counts(session, dataset_id) == {"a": per_class, "b": per_class}
    return dataset_id


def queue_jobs(settings: Settings, count: int) -> list[int]:
    dataset_id = make_dataset(settings)
    with session_scope(settings) as session:
        jobs = [
            create_job(session, spec=JobSpec(dataset_id=dataset_id, model="simple_cnn"))[0]
            for _ in range(count)
        ]
        return [job.id for job in jobs]


def claim(settings: Settings, worker_id: str) -> queue.Lease | None:
    with session_scope(settings) as session:
        return queue.claim_next_job(session, worker_id=worker_id)


def requeue(settings: Settings, *, max_attempts: int = 3) -> int:
    with session_scope(settings) as session:
        return queue.requeue_stale_jobs(
            session, lease_timeout_seconds=LEASE_TIMEOUT, max_attempts=max_attempts
        )


def age_heartbeat(settings: Settings, job_id: int, *, seconds: float = 10 * LEASE_TIMEOUT) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == job_id)
            .values(heartbeat_at=now() - timedelta(seconds=seconds))
        )


def job_state(settings: Settings, job_id: int) -> dict[str, Any]:
    with session_scope(settings) as session:
        job = session.get(TrainingJob, job_id)
        assert job is not None
        state = {
            column.key: getattr(job, column.key)
            for column in TrainingJob.__table__.columns  # type: ignore[attr-defined]
        }
        for table in (EpochMetric, Checkpoint, Evaluation):
            state[f"{table.__tablename__}_rows"] = session.scalar(
                select(func.count()).select_from(table).where(table.job_id == job_id)
            )
        return state


EPOCH_VALUES = {
    "epoch": 1,
    "train_loss": 0.5,
    "train_acc": 0.75,
    "val_loss": 0.6,
    "val_acc": 0.7,
    "lr": 0.001,
    "seconds": 1.0,
    "images_per_second": 100.0,
}


# --- (a) the API on PostgreSQL ------------------------------------------------------------------------


@pytest.mark.postgres
def test_api_flow_on_postgres(pg_client: TestClient) -> None:
    client = pg_client
    response = client.post("/datasets", json={"name": "pets"})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]

    for label, seeds in (("cat", (1, 2, 3)), ("dog", (4, 5, 6))):
        files = [("files", (f"{label}-{seed}.png", noise_png(seed), "image/png")) for seed in seeds]
        response = client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files)
        assert response.status_code == 201, response.text
        assert response.json() == {"added": 3, "duplicates": 0, "rejected": [], "conflicts": []}

    # The same bytes twice in one request, and again in a later one (even under another label).
    twice = [("files", (name, noise_png(7), "image/png")) for name in ("x.png", "copy-of-x.png")]
    response = client.post(f"/datasets/{dataset_id}/images", data={"label": "cat"}, files=twice)
    assert response.json() == {"added": 1, "duplicates": 1, "rejected": [], "conflicts": []}
    again = [("files", ("y.png", noise_png(1), "image/png")), ("files", ("z.png", noise_png(7), "image/png"))]
    response = client.post(f"/datasets/{dataset_id}/images", data={"label": "dog"}, files=again)
    assert response.status_code == 201, response.text
    summary = response.json()
    assert (summary["added"], summary["duplicates"], summary["rejected"]) == (0, 2, [])
    # Stored once, under its first label; the disagreement is named (issue 21).
    assert [
        (c["filename"], c["label"], c["existing_filename"], c["existing_label"]) for c in summary["conflicts"]
    ] == [
        ("y.png", "dog", "cat-1.png", "cat"),
        ("z.png", "dog", "x.png", "cat"),
    ]

    body = client.get(f"/datasets/{dataset_id}").json()
    assert body["num_images"] == 7
    assert body["classes"] == [{"name": "cat", "count": 4}, {"name": "dog", "count": 3}]

    response = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 2})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["spec"]["epochs"] == 2 and job["spec"]["optimizer"] == "adamw"
    assert job["info"] == {} and job["attempts"] == 0 and job["worker_id"] is None

    fetched = client.get(f"/jobs/{job['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == job
    assert [j["id"] for j in client.get("/jobs").json()] == [job["id"]]
    assert client.get("/jobs/999999").status_code == 404


@pytest.mark.postgres
def test_idempotency_key_on_postgres(pg_client: TestClient) -> None:
    client = pg_client
    dataset_id = client.post("/datasets", json={"name": "idem"}).json()["id"]
    for label, seed in (("a", 11), ("b", 12)):
        files = [("files", (f"{label}.png", noise_png(seed), "image/png"))]
        assert (
            client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files).status_code
            == 201
        )
    spec = {"dataset_id": dataset_id, "model": "simple_cnn"}
    first = client.post("/jobs", json=spec, headers={"Idempotency-Key": "k-1"})
    second = client.post("/jobs", json=spec, headers={"Idempotency-Key": "k-1"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert len(client.get("/jobs").json()) == 1


@pytest.mark.postgres
def test_racing_requests_with_one_idempotency_key_make_one_job(postgres_url: str) -> None:
    """Two transactions both find no job for the key; the second then waits on the unique index
    until the first commits. It must return the first job, not fail (a 500 through the API)."""
    settings = make_settings(postgres_url)
    spec = JobSpec(dataset_id=make_dataset(settings), model="simple_cnn")
    results: dict[str, Any] = {}

    def second_request() -> None:
        try:
            with session_scope(settings) as session:
                job, created = create_job(session, spec=spec, idempotency_key="same")
                results["second"] = (job.id, created)
        except Exception as exc:
            results["second"] = exc

    with session_scope(settings) as session:
        job, created = create_job(session, spec=spec, idempotency_key="same")
        results["first"] = (job.id, created)
        racer = threading.Thread(target=second_request)
        racer.start()
        with session_scope(settings) as observer:  # wait until the second insert blocks on our row
            for _ in range(200):
                waiting = observer.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                if waiting or not racer.is_alive():
                    break
                time.sleep(0.05)
    racer.join(timeout=30)

    assert results["second"] == (results["first"][0], False)
    assert results["first"][1] is True
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(TrainingJob)) == 1


@pytest.mark.postgres
def test_images_are_stored_once_per_dataset_on_postgres(postgres_url: str) -> None:
    """ON CONFLICT DO NOTHING on PostgreSQL: the same bytes in two datasets are two rows, one per dataset."""
    settings = make_settings(postgres_url)
    first, second = make_dataset(settings), make_dataset(settings)
    with session_scope(settings) as session:
        result = add_uploads(
            session, dataset_id=first, uploads=[Upload(filename="dup.png", label="a", data=noise_png(0))]
        )
        assert (result.added, result.duplicates) == (0, 1)
        rows = session.execute(select(Image.dataset_id, func.count()).group_by(Image.dataset_id)).all()
        counts = {dataset_id: count for dataset_id, count in rows}
    assert counts == {first: 4, second: 4}


# --- (b) concurrent claiming --------------------------------------------------------------------------


def test_concurrent_claimers_take_each_job_exactly_once(db_settings: Settings) -> None:
    job_ids = queue_jobs(db_settings, 20)
    workers = 4
    start = threading.Barrier(workers)

    def work(index: int) -> list[queue.Lease]:
        worker_id = f"worker-{index}"
        start.wait(timeout=10)
        leases = []
        while (lease := claim(db_settings, worker_id)) is not None:
            assert lease.worker_id == worker_id
            leases.append(lease)
        return leases

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = [future.result(timeout=60) for future in [pool.submit(work, i) for i in range(workers)]]

    leases = [lease for result in results for lease in result]
    claimed = sorted(lease.job_id for lease in leases)
    assert claimed == sorted(job_ids), "every job claimed exactly once"
    assert all(lease.attempt == 1 for lease in leases)
    with session_scope(db_settings) as session:
        rows = {job.id: job for job in session.scalars(select(TrainingJob))}
    assert {job.status for job in rows.values()} == {JobStatus.running}
    for lease in leases:
        assert rows[lease.job_id].worker_id == lease.worker_id
        assert rows[lease.job_id].attempts == 1
        assert rows[lease.job_id].heartbeat_at is not None
    assert claim(db_settings, "late") is None


def test_claims_go_oldest_first(db_settings: Settings) -> None:
    job_ids = queue_jobs(db_settings, 3)
    leases = [claim(db_settings, "w") for _ in range(3)]
    assert [lease.job_id for lease in leases if lease] == job_ids


@pytest.mark.postgres
def test_skip_locked_lets_a_second_claimer_through_an_open_claim(postgres_url: str) -> None:
    """On PostgreSQL a claim in flight blocks no other worker: SKIP LOCKED hands out the next job."""
    settings = make_settings(postgres_url)
    first_id, second_id = queue_jobs(settings, 2)
    with session_scope(settings) as holding:
        held = queue.claim_next_job(holding, worker_id="slow")
        assert held is not None and held.job_id == first_id
        with session_scope(settings) as other:
            other.execute(text("SET LOCAL lock_timeout = '2s'"))
            lease = queue.claim_next_job(other, worker_id="fast")
        assert lease is not None and lease.job_id == second_id
    assert claim(settings, "third") is None


# --- (c) stale leases ---------------------------------------------------------------------------------


def test_requeue_returns_a_stale_job_to_the_queue(db_settings: Settings) -> None:
    stale_id, fresh_id = queue_jobs(db_settings, 2)
    assert claim(db_settings, "dead").job_id == stale_id  # type: ignore[union-attr]
    assert claim(db_settings, "alive").job_id == fresh_id  # type: ignore[union-attr]
    age_heartbeat(db_settings, stale_id)
    age_heartbeat(db_settings, fresh_id, seconds=LEASE_TIMEOUT / 2)

    assert requeue(db_settings) == 1

    stale, fresh = job_state(db_settings, stale_id), job_state(db_settings, fresh_id)
    assert stale["status"] == JobStatus.queued
    assert stale["worker_id"] is None
    assert stale["attempts"] == 1
    assert stale["finished_at"] is None
    assert stale["progress"]["phase"] == "queued"
    assert "dead" in stale["progress"]["requeued_because"]
    assert (fresh["status"], fresh["worker_id"]) == (JobStatus.running, "alive")
    assert requeue(db_settings) == 0

    again = claim(db_settings, "next")
    assert again is not None and (again.job_id, again.attempt) == (stale_id, 2)


def test_requeue_fails_a_job_out_of_attempts(db_settings: Settings) -> None:
    (job_id,) = queue_jobs(db_settings, 1)
    for attempt in (1, 2):
        lease = claim(db_settings, f"w{attempt}")
        assert lease is not None and lease.attempt == attempt
        age_heartbeat(db_settings, job_id)
        assert requeue(db_settings, max_attempts=2) == 1

    state = job_state(db_settings, job_id)
    assert state["status"] == JobStatus.failed
    assert state["attempts"] == 2
    assert state["worker_id"] is None
    assert state["finished_at"] is not None
    assert "gave up after 2 attempts" in state["error"]
    assert claim(db_settings, "w3") is None
    assert requeue(db_settings, max_attempts=2) == 0


# --- (d) fencing --------------------------------------------------------------------------------------


def _record_epoch(session: Session, lease: queue.Lease) -> None:
    queue.record_epoch(session, lease, values=dict(EPOCH_VALUES))


def _store_checkpoint(session: Session, lease: queue.Lease) -> None:
    queue.store_checkpoint(
        session,
        lease,
        kind=CheckpointKind.best,
        epoch=1,
        metric="val_acc",
        value=0.9,
        meta={"model": "simple_cnn"},
        weights=b"stale weights",
    )


def _finish_job(session: Session, lease: queue.Lease) -> None:
    queue.finish_job(session, lease, status=JobStatus.succeeded, stop_reason="completed")


def _heartbeat(session: Session, lease: queue.Lease) -> None:
    queue.heartbeat(session, lease, progress={"phase": "train", "epoch": 9})


def _start_attempt(session: Session, lease: queue.Lease) -> None:
    queue.start_attempt(session, lease, classes=["x", "y"], split_sizes={"train": 1})


def _set_job_info(session: Session, lease: queue.Lease) -> None:
    queue.set_job_info(session, lease, info={"device": "stale"})


def _store_evaluation(session: Session, lease: queue.Lease) -> None:
    queue.store_evaluation(
        session,
        lease,
        values={
            "split": "test",
            "epoch": 1,
            "num_samples": 1,
            "loss": 0.1,
            "accuracy": 1.0,
            "top5": None,
            "macro_precision": 1.0,
            "macro_recall": 1.0,
            "macro_f1": 1.0,
            "per_class": [],
            "confusion_matrix": [[1]],
        },
    )


def _release_job(session: Session, lease: queue.Lease) -> None:
    queue.release_job(session, lease, reason="shutting down")


FENCED_WRITES: list[Callable[[Session, queue.Lease], None]] = [
    _record_epoch,
    _store_checkpoint,
    _finish_job,
    _heartbeat,
    _start_attempt,
    _set_job_info,
    _store_evaluation,
    _release_job,
]


@pytest.mark.parametrize("successor", ["worker-2", "worker-1"], ids=["other-worker", "same-worker-id"])
def test_writes_with_a_lost_lease_raise_and_change_nothing(db_settings: Settings, successor: str) -> None:
    """A worker whose job was requeued and re-claimed cannot write; the attempt number fences it
    even when the successor has the same worker id."""
    (job_id,) = queue_jobs(db_settings, 1)
    old = claim(db_settings, "worker-1")
    assert old is not None
    age_heartbeat(db_settings, job_id)
    assert requeue(db_settings) == 1
    new = claim(db_settings, successor)
    assert new is not None and (new.job_id, new.attempt) == (job_id, 2)
    with session_scope(db_settings) as session:  # the successor has written some results already
        _record_epoch(session, new)
        _store_checkpoint(session, new)
    before = job_state(db_settings, job_id)

    for write in FENCED_WRITES:
        with pytest.raises(queue.LeaseLost), session_scope(db_settings) as session:
            write(session, old)
        assert job_state(db_settings, job_id) == before, write.__name__

    with session_scope(db_settings) as session:  # the current holder still can
        _finish_job(session, new)
    after = job_state(db_settings, job_id)
    assert after["status"] == JobStatus.succeeded
    assert after["best_value"] == 0.9
    assert (after["epoch_metric_rows"], after["checkpoint_rows"]) == (1, 1)


def test_writes_after_finish_or_cancel_raise(db_settings: Settings) -> None:
    first_id, second_id = queue_jobs(db_settings, 2)
    finished = claim(db_settings, "w")
    assert finished is not None and finished.job_id == first_id
    with session_scope(db_settings) as session:
        _finish_job(session, finished)
    with pytest.raises(queue.LeaseLost), session_scope(db_settings) as session:
        _record_epoch(session, finished)

    running = claim(db_settings, "w")
    assert running is not None and running.job_id == second_id
    with session_scope(db_settings) as session:
        session.execute(update(TrainingJob).where(TrainingJob.id == second_id).values(cancel_requested=True))
    with session_scope(db_settings) as session:
        assert queue.heartbeat(session, running) is True  # told to stop, but still its lease
        queue.finish_job(session, running, status=JobStatus.cancelled, stop_reason="cancelled")
    with pytest.raises(queue.LeaseLost), session_scope(db_settings) as session:
        _store_checkpoint(session, running)
    assert job_state(db_settings, second_id)["checkpoint_rows"] == 0
