"""The whole loop over real HTTP: `trainserve up` as a subprocess, real digits, train, follow, predict."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import trainserve_up
from tests.factories import digits, zip_bytes

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path, database_url: str) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes], Path]]:
    log_path = tmp_path / "up.log"
    with trainserve_up(database_url, log_path) as (client, process):
        yield client, process, log_path


def wait_for(client: httpx.Client, job_id: int, statuses: set[str], timeout: float = 300) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not {statuses} after {timeout}s: {job}")


def test_upload_train_follow_predict_over_http(
    server: tuple[httpx.Client, subprocess.Popen[bytes], Path],
) -> None:
    client, process, log_path = server
    samples = digits()
    dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]

    # Classes 0-4 as multipart uploads of several files per request, 5-9 as one ImageFolder zip.
    for label in "01234":
        files = [
            ("files", (f"{label}-{i}.png", data, "image/png"))
            for i, (name, data) in enumerate(samples)
            if name == label
        ]
        response = client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files)
        assert response.status_code == 201, response.text
        assert response.json()["rejected"] == []
    archive = zip_bytes(
        [(f"digits/{name}/{i}.png", data) for i, (name, data) in enumerate(samples) if name in "56789"]
    )
    response = client.post(
        f"/datasets/{dataset_id}/archive", files={"file": ("digits.zip", archive, "application/zip")}
    )
    assert response.status_code == 201, response.text
    dataset = client.get(f"/datasets/{dataset_id}").json()
    assert dataset["num_images"] == len({data for _, data in samples})
    assert [c["name"] for c in dataset["classes"]] == list("0123456789")

    epochs = 8
    job = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": epochs}
    ).json()
    assert job["status"] == "queued"

    # Follow the curve while it grows: rows appear one per epoch before the job ends.
    seen_running_partial = False
    counts: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = client.get(f"/jobs/{job['id']}/metrics").json()
        counts.append(len(metrics["epochs"]))
        if metrics["status"] == "running" and 0 < len(metrics["epochs"]) < epochs:
            seen_running_partial = True
            assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, len(metrics["epochs"]) + 1))
        if metrics["status"] not in {"queued", "running"}:
            break
        time.sleep(0.2)
    assert metrics["status"] == "succeeded", log_path.read_text()[-3000:]
    assert seen_running_partial, f"never saw a partial curve while running: {counts}"
    assert counts == sorted(counts)
    assert [row["epoch"] for row in metrics["epochs"]] == list(range(1, epochs + 1))

    done = client.get(f"/jobs/{job['id']}").json()
    sizes = done["split_sizes"]
    assert sum(sizes.values()) == dataset["num_images"]
    # Stratified 0.7/0.2/0.1 per class (~180 images each): rounding moves a split by at most 1 per class.
    assert abs(sizes["val"] - 0.2 * dataset["num_images"]) <= 10
    assert abs(sizes["test"] - 0.1 * dataset["num_images"]) <= 10
    evaluation = client.get(f"/jobs/{job['id']}/evaluation").json()
    assert evaluation["num_samples"] == sizes["test"]
    assert [c["support"] for c in evaluation["per_class"]] == [
        sum(row) for row in evaluation["confusion_matrix"]
    ]
    assert evaluation["accuracy"] > 0.9, evaluation  # chance is 0.1
    best_epoch = done["best"]["epoch"]
    print(f"\nend-to-end digits test accuracy: {evaluation['accuracy']:.4f} (best epoch {best_epoch})")

    correct = 0
    held_out = [(label, data) for label, data in samples[::60]]
    for label, data in held_out:
        prediction = client.post(
            "/predict", data={"job_id": job["id"]}, files={"file": ("digit.png", data, "image/png")}
        ).json()
        assert set(prediction["scores"]) == set("0123456789")
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        correct += prediction["label"] == label
    assert correct / len(held_out) > 0.8

    checkpoint = client.get(f"/jobs/{job['id']}/checkpoint")
    assert checkpoint.status_code == 200 and len(checkpoint.content) > 1000

    # Ctrl-C stops the API and the worker cleanly.
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0, log_path.read_text()[-3000:]


def test_cancel_running_job_keeps_best_checkpoint(
    server: tuple[httpx.Client, subprocess.Popen[bytes], Path],
) -> None:
    client, _process, _log = server
    samples = digits()[:400]
    dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]
    archive = zip_bytes([(f"{label}/{i}.png", data) for i, (label, data) in enumerate(samples)])
    client.post(f"/datasets/{dataset_id}/archive", files={"file": ("d.zip", archive, "application/zip")})
    job = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 500}).json()

    deadline = time.monotonic() + 120
    while not client.get(f"/jobs/{job['id']}/metrics").json()["epochs"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    cancelled = wait_for(client, job["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
    assert cancelled["status"] == "cancelled"
    assert cancelled["stop_reason"].startswith("cancelled after")
    assert cancelled["best"] is not None
    rows = client.get(f"/jobs/{job['id']}/metrics").json()["epochs"]
    assert 1 <= len(rows) < 500
    prediction = client.post(
        "/predict", data={"job_id": job["id"]}, files={"file": ("d.png", samples[0][1], "image/png")}
    )
    assert prediction.status_code == 200


def test_what_a_201_created_can_be_read_at_once(
    server: tuple[httpx.Client, subprocess.Popen[bytes], Path],
) -> None:
    """The transaction commits before the response is sent: a client never reads behind its own write."""
    client, _process, _log = server
    misses = []
    for i in range(150):
        dataset_id = client.post("/datasets", json={"name": f"d{i}"}).json()["id"]
        if client.get(f"/datasets/{dataset_id}").status_code != 200:
            misses.append(dataset_id)
    assert misses == []
