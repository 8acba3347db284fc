"""A job interrupted between epochs resumes from its last checkpoint as if nothing had happened."""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi.testclient import TestClient

from app.core.config import Settings
from tests.integration.test_training_options import FIELDS_THAT_VARY_WITH_TIME, digits_dataset
from workers.loop import serve


def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in FIELDS_THAT_VARY_WITH_TIME} for row in rows]


def test_interrupted_job_resumes_and_matches_an_uninterrupted_run(
    client: TestClient, settings: Settings
) -> None:
    dataset_id = digits_dataset(client, per_class=30)
    spec = {
        "dataset_id": dataset_id,
        "model": "simple_cnn",
        "epochs": 5,
        "batch_size": 16,
        "scheduler": "step",
        "step_size": 2,
        "gamma": 0.5,
        "ema_decay": 0.9,
        "augmentation": "strong",
        "monitor": "val_loss",
    }
    reference = client.post("/jobs", json=spec).json()["id"]
    serve(settings, once=True)
    interrupted = client.post("/jobs", json=spec).json()["id"]

    shutdown = threading.Event()

    def stop_after_epoch_two() -> None:  # what SIGTERM does to a worker, once two epochs are stored
        while len(client.get(f"/jobs/{interrupted}/metrics").json()["epochs"]) < 2:
            time.sleep(0.02)
        shutdown.set()

    watcher = threading.Thread(target=stop_after_epoch_two)
    watcher.start()
    serve(settings, once=True, shutdown=shutdown)
    watcher.join()
    paused = client.get(f"/jobs/{interrupted}").json()
    assert paused["status"] == "queued", paused
    stored = len(client.get(f"/jobs/{interrupted}/metrics").json()["epochs"])
    assert 2 <= stored < 5

    serve(settings, once=True)  # a new attempt picks it up
    done = client.get(f"/jobs/{interrupted}").json()
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["info"]["resumed_from_epoch"] == stored

    rows = client.get(f"/jobs/{interrupted}/metrics").json()["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    expected = client.get(f"/jobs/{reference}/metrics").json()["epochs"]
    assert strip(rows) == strip(expected)  # same lr schedule, weights, EMA and RNG streams
    assert done["best"] == client.get(f"/jobs/{reference}").json()["best"]
    evaluation = client.get(f"/jobs/{interrupted}/evaluation").json()
    assert evaluation["accuracy"] == client.get(f"/jobs/{reference}/evaluation").json()["accuracy"]


def test_images_uploaded_after_the_first_attempt_do_not_change_a_resumed_job(
    client: TestClient, settings: Settings
) -> None:
    from tests.factories import noise_png

    dataset_id = digits_dataset(client, per_class=20, classes="01")
    job_id = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 3, "batch_size": 4}
    ).json()["id"]
    shutdown = threading.Event()

    def stop_after_epoch_one() -> None:
        while not client.get(f"/jobs/{job_id}/metrics").json()["epochs"]:
            time.sleep(0.02)
        shutdown.set()

    watcher = threading.Thread(target=stop_after_epoch_one)
    watcher.start()
    serve(settings, once=True, shutdown=shutdown)
    watcher.join()
    assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
    sizes = client.get(f"/jobs/{job_id}").json()["split_sizes"]
    files = [("files", (f"{i}.png", noise_png(100 + i), "image/png")) for i in range(10)]
    client.post(f"/datasets/{dataset_id}/images", data={"label": "2"}, files=files)

    serve(settings, once=True)
    done = client.get(f"/jobs/{job_id}").json()
    assert done["status"] == "succeeded"
    assert done["split_sizes"] == sizes
    assert done["classes"] == ["0", "1"]


def test_a_finished_job_keeps_its_best_checkpoint_and_drops_the_resumable_one(
    client: TestClient, settings: Settings
) -> None:
    from sqlalchemy import select

    from app.db.session import read_scope
    from app.db.tables import Checkpoint

    dataset_id = digits_dataset(client, per_class=10, classes="01")
    job_id = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 2}).json()[
        "id"
    ]
    serve(settings, once=True)
    with read_scope(settings) as session:
        kinds = session.scalars(select(Checkpoint.kind).where(Checkpoint.job_id == job_id)).all()
    assert [kind.value for kind in kinds] == ["best"]
