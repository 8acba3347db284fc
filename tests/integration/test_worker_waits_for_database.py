"""A worker started before the database is migrated (containers start together) waits, then serves."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.main import create_app
from migrations import upgrade_to_head
from tests.conftest import make_settings
from tests.factories import digits
from workers.loop import serve


def wait_until(condition: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_worker_waits_for_the_schema_then_trains(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'trainserve.db'}"
    settings = make_settings(url)
    shutdown = threading.Event()
    worker = threading.Thread(target=serve, args=(settings,), kwargs={"shutdown": shutdown})
    caplog.set_level(logging.INFO, logger="workers.loop")
    worker.start()
    try:
        wait_until(lambda: "database not ready, retrying" in caplog.text)
        time.sleep(0.5)  # several more polls against the empty database
        assert worker.is_alive()
        assert caplog.text.count("database not ready") == 1  # logged once per outage, not per poll

        upgrade_to_head(url)
        with TestClient(create_app(settings)) as client:
            dataset_id = client.post("/datasets", json={"name": "two digits"}).json()["id"]
            for label in "01":
                files = [
                    ("files", (f"{label}-{i}.png", data, "image/png"))
                    for i, (name, data) in enumerate(digits()[:200])
                    if name == label
                ]
                client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files)
            job = client.post("/jobs", json={"dataset_id": dataset_id, "model": "lenet", "epochs": 1}).json()
            wait_until(lambda: client.get(f"/jobs/{job['id']}").json()["status"] == "succeeded")
        assert "database ready" in caplog.text
    finally:
        shutdown.set()
        worker.join(timeout=60)
    assert not worker.is_alive()


def test_run_once_worker_fails_at_once_on_an_unmigrated_database(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite:///{tmp_path / 'trainserve.db'}")
    with pytest.raises(OperationalError, match="no such table"):
        serve(settings, once=True)
