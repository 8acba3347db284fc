"""Several workers and many clients at once, over real HTTP: every job runs exactly once, every
image is stored, and SQLite never reports `database is locked`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import trainserve_up
from tests.factories import digits, noise_png

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    log = tmp_path / "up.log"
    with trainserve_up(database_url, log, workers=3) as (client, _process):
        yield client, log


def test_three_workers_run_twelve_jobs_exactly_once(stack: tuple[httpx.Client, Path]) -> None:
    client, log = stack
    dataset_id = client.post("/datasets", json={"name": "two digits"}).json()["id"]
    for label in "01":
        samples = [data for name, data in digits() if name == label][:12]
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(samples)]
        assert (
            client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files).status_code
            == 201
        )
    spec = {"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 2, "image_size": 16}
    job_ids = [client.post("/jobs", json={**spec, "seed": i}).json()["id"] for i in range(12)]

    deadline = time.monotonic() + 300
    while True:
        jobs = [client.get(f"/jobs/{job_id}").json() for job_id in job_ids]
        if all(job["status"] not in {"queued", "running"} for job in jobs):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.5)
    assert [job["status"] for job in jobs] == ["succeeded"] * 12, [j["error"] for j in jobs]
    assert [job["attempts"] for job in jobs] == [1] * 12
    assert len({job["worker_id"] for job in jobs}) >= 2  # the work was shared
    for job_id in job_ids:
        assert [r["epoch"] for r in client.get(f"/jobs/{job_id}/metrics").json()["epochs"]] == [1, 2]
    assert "database is locked" not in log.read_text()
    assert "Traceback" not in log.read_text()


def test_eight_uploaders_while_workers_write_metrics(stack: tuple[httpx.Client, Path]) -> None:
    client, log = stack
    training = client.post("/datasets", json={"name": "digits"}).json()["id"]
    for label in "0123":
        samples = [data for name, data in digits() if name == label][:60]
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(samples)]
        client.post(f"/datasets/{training}/images", data={"label": label}, files=files)
    for seed in range(2):
        client.post("/jobs", json={"dataset_id": training, "model": "simple_cnn", "epochs": 3, "seed": seed})

    target = client.post("/datasets", json={"name": "uploads"}).json()["id"]

    def upload(uploader: int) -> list[int]:
        statuses = []
        for batch in range(5):
            files = [
                (
                    "files",
                    (f"u{uploader}-{batch}-{i}.png", noise_png(10_000 * uploader + 100 * batch + i), "x"),
                )
                for i in range(6)
            ]
            response = client.post(
                f"/datasets/{target}/images", data={"label": f"c{uploader % 3}"}, files=files
            )
            statuses.append(response.status_code)
        return statuses

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(upload, range(8)))
    assert all(status == 201 for statuses in results for status in statuses), results
    assert client.get(f"/datasets/{target}").json()["num_images"] == 8 * 5 * 6
    assert "database is locked" not in log.read_text()
