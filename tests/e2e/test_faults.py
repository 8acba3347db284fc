"""Faults injected into real worker processes: SIGKILL mid-epoch and SIGTERM. Nothing may be lost."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.conftest import make_settings
from tests.e2e import processes
from tests.factories import digits

pytestmark = pytest.mark.e2e


@pytest.fixture
def fault_settings(database_url: str) -> Settings:
    return make_settings(database_url, lease_timeout_seconds=3.0, heartbeat_seconds=0.5)


@pytest.fixture
def api(fault_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(fault_settings)) as client:
        yield client


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return processes.start_worker(
        settings.database_url,
        log,
        TRAINSERVE_LEASE_TIMEOUT_SECONDS=str(settings.lease_timeout_seconds),
        TRAINSERVE_HEARTBEAT_SECONDS=str(settings.heartbeat_seconds),
    )


def submit_slow_job(client: TestClient, epochs: int) -> int:
    """Digits at 64 pixels with small batches: a few seconds per epoch, time enough to hit one."""
    dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]
    by_label: dict[str, list[bytes]] = {}
    for label, data in digits()[:400]:
        by_label.setdefault(label, []).append(data)
    for label, images in by_label.items():
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files)
    spec = {
        "dataset_id": dataset_id,
        "model": "simple_cnn",
        "epochs": epochs,
        "image_size": 64,
        "batch_size": 8,
    }
    return int(client.post("/jobs", json=spec).json()["id"])


def wait_until(predicate, timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sigkill_mid_epoch_three_loses_nothing(
    api: TestClient, fault_settings: Settings, tmp_path: Path
) -> None:
    job_id = submit_slow_job(api, epochs=6)
    first = start_worker(fault_settings, tmp_path / "worker1.log")
    try:
        wait_until(
            lambda: (
                api.get(f"/jobs/{job_id}").json()["progress"].get("epoch") == 3
                and api.get(f"/jobs/{job_id}").json()["progress"].get("phase") == "training"
            )
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["epoch"] for r in api.get(f"/jobs/{job_id}/metrics").json()["epochs"]] == [1, 2]
    assert api.get(f"/jobs/{job_id}").json()["status"] == "running"  # until the lease runs out

    second = start_worker(fault_settings, tmp_path / "worker2.log")
    try:
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["status"] in {"succeeded", "failed"})
    finally:
        second.terminate()
        second.wait(timeout=30)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", (job, (tmp_path / "worker2.log").read_text()[-3000:])
    assert job["attempts"] == 2
    assert job["info"]["resumed_from_epoch"] == 2
    rows = api.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    best = max(rows, key=lambda r: r["val_acc"])
    assert job["best"]["value"] == pytest.approx(best["val_acc"])
    assert api.get(f"/jobs/{job_id}/evaluation").status_code == 200
    logs = (tmp_path / "worker1.log").read_text() + (tmp_path / "worker2.log").read_text()
    assert "database is locked" not in logs


def test_sigterm_requeues_the_job_and_exits_within_seconds(
    api: TestClient, fault_settings: Settings, tmp_path: Path
) -> None:
    job_id = submit_slow_job(api, epochs=4)
    worker = start_worker(fault_settings, tmp_path / "worker1.log")
    try:
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["progress"].get("epoch") == 2)
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(timeout=20) == 0
        print(f"\nworker exited {time.monotonic() - started:.1f} s after SIGTERM")
    finally:
        if worker.poll() is None:
            worker.kill()
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "queued", job
    assert "worker shut down" in job["progress"]["requeued_because"]

    again = start_worker(fault_settings, tmp_path / "worker2.log")
    try:
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["status"] in {"succeeded", "failed"})
    finally:
        again.terminate()
        again.wait(timeout=30)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert [r["epoch"] for r in api.get(f"/jobs/{job_id}/metrics").json()["epochs"]] == [1, 2, 3, 4]


def test_zombie_worker_that_lost_its_lease_writes_nothing(
    api: TestClient, fault_settings: Settings, tmp_path: Path
) -> None:
    job_id = submit_slow_job(api, epochs=5)
    zombie = start_worker(fault_settings, tmp_path / "zombie.log")
    successor: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["progress"].get("epoch") == 2)
        zombie.send_signal(signal.SIGSTOP)  # paused past its lease, like a VM freeze or a GC stall
        successor = start_worker(fault_settings, tmp_path / "successor.log")
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["attempts"] == 2)
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["progress"].get("phase") == "training")
        zombie.send_signal(signal.SIGCONT)
        wait_until(lambda: "no longer held" in (tmp_path / "zombie.log").read_text(), timeout=60)
        wait_until(lambda: api.get(f"/jobs/{job_id}").json()["status"] in {"succeeded", "failed"})
    finally:
        for process in (zombie, successor):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
                process.wait(timeout=30)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert [r["epoch"] for r in api.get(f"/jobs/{job_id}/metrics").json()["epochs"]] == [1, 2, 3, 4, 5]
    assert "abandoning it" in (tmp_path / "zombie.log").read_text()
