"""The worker's decoded-image cache across jobs, and the throughput columns of every metrics row."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.core.config import Settings
from tests.factories import noise_png
from tests.integration.test_jobs_api import submit, upload_digits
from workers.loop import serve


def run_job(client: TestClient, settings: Settings, **spec: object) -> dict:  # type: ignore[type-arg]
    job = submit(client, **spec)
    serve(settings, once=True)
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    return done  # type: ignore[no-any-return]


def test_jobs_share_the_cache_until_the_dataset_changes(client: TestClient, settings: Settings) -> None:
    dataset_id = upload_digits(client, per_class=12, classes=3)
    spec = {"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 1, "batch_size": 16}

    first = run_job(client, settings, **spec)
    cache = first["info"]["data_cache"]
    assert cache["hit"] is False and cache["build_seconds"] >= 0 and cache["bytes"] == 36 * 28 * 28
    assert first["info"]["data_placement"] == "memory-mapped"
    entries = [p for p in (Path(settings.cache_dir) / "decoded").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith(cache["key"])

    second = run_job(client, settings, **spec, seed=1)
    assert second["info"]["data_cache"] == {**cache, "hit": True}

    other_size = run_job(client, settings, **spec, image_size=20)
    assert other_size["info"]["data_cache"]["hit"] is False
    assert other_size["info"]["data_cache"]["key"] != cache["key"]

    added = client.post(
        f"/datasets/{dataset_id}/images",
        data={"label": "0"},
        files=[("files", ("new.png", noise_png(7, (8, 8)), "image/png"))],
    )
    assert added.json()["added"] == 1
    changed = run_job(client, settings, **spec)
    assert changed["info"]["data_cache"]["hit"] is False
    assert changed["info"]["data_cache"]["bytes"] == 37 * 28 * 28


def test_metrics_rows_carry_throughput_and_data_wait(client: TestClient, settings: Settings) -> None:
    dataset_id = upload_digits(client, per_class=10, classes=3)
    job = run_job(client, settings, dataset_id=dataset_id, model="simple_cnn", epochs=2, batch_size=8)
    rows = client.get(f"/jobs/{job['id']}/metrics").json()["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    train_images = job["split_sizes"]["train"]
    for row in rows:
        assert row["images_per_second"] > 0
        # images/s is over the training pass only: never slower than the whole epoch's rate
        assert row["images_per_second"] >= train_images / row["seconds"]
        assert 0 < row["data_seconds"] < row["seconds"]
    csv = client.get(f"/jobs/{job['id']}/metrics", params={"format": "csv"}).text
    header = csv.splitlines()[0].split(",")
    assert "images_per_second" in header and "data_seconds" in header
