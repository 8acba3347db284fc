"""Job submission, validation and the worker's results, through the API and the real worker loop."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors import safe_open

from app.core.config import Settings
from tests.factories import digits, noise_png
from workers.loop import serve


def upload_digits(client: TestClient, *, per_class: int, classes: int = 10) -> int:
    dataset_id = int(client.post("/datasets", json={"name": "digits"}).json()["id"])
    by_label: dict[str, list[bytes]] = {}
    for label, data in digits():
        if int(label) < classes and len(by_label.setdefault(label, [])) < per_class:
            by_label[label].append(data)
    for label, images in by_label.items():
        files = [("files", (f"{label}-{i}.png", data, "image/png")) for i, data in enumerate(images)]
        assert (
            client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files).status_code
            == 201
        )
    return dataset_id


def submit(client: TestClient, **spec: object) -> dict:  # type: ignore[type-arg]
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_job_is_queued_with_defaults_filled_in(client: TestClient) -> None:
    dataset_id = upload_digits(client, per_class=3, classes=2)
    job = submit(client, dataset_id=dataset_id, model="simple_cnn")
    assert job["status"] == "queued"
    assert job["spec"]["epochs"] == 10
    assert job["spec"]["optimizer"] == "adamw"
    assert (job["spec"]["devices"], job["spec"]["nodes"], job["spec"]["lr_scaling"]) == (1, 1, "none")
    assert job["best"] is None and job["error"] is None
    assert client.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
    assert [j["id"] for j in client.get("/jobs").json()] == [job["id"]]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"model": "resnet9000"}, "model"),
        ({"model": "simple_cnn", "lr": -0.1}, "lr"),
        ({"model": "simple_cnn", "epochs": 0}, "epochs"),
        ({"model": "simple_cnn", "optimizer": "sgdd"}, "optimizer"),
        ({"model": "simple_cnn", "learning_rate": 0.1}, "learning_rate"),
        ({"model": "alexnet", "image_size": 32}, None),
        ({"model": "simple_cnn", "devices": 0}, "devices"),
        ({"model": "simple_cnn", "devices": "all"}, "devices"),
        ({"model": "simple_cnn", "devices": 2.5}, "devices"),
        ({"model": "simple_cnn", "nodes": 0}, "nodes"),
        ({"model": "simple_cnn", "lr_scaling": "cubic"}, "lr_scaling"),
        ({}, "model"),
    ],
)
def test_bad_spec_is_422_naming_the_field(client: TestClient, spec: dict, field: str | None) -> None:  # type: ignore[type-arg]
    dataset_id = upload_digits(client, per_class=2, classes=2)
    response = client.post("/jobs", json={"dataset_id": dataset_id, **spec})
    assert response.status_code == 422
    detail = response.json()["detail"]
    if field is not None:
        assert field in [error["loc"][-1] for error in detail], detail
    else:
        assert "image_size" in detail[0]["msg"]


def test_unknown_model_message_lists_the_choices(client: TestClient) -> None:
    response = client.post("/jobs", json={"dataset_id": 1, "model": "resnet9000"})
    message = response.json()["detail"][0]["msg"]
    assert "unknown model 'resnet9000'" in message and "simple_cnn" in message


def test_job_on_unknown_dataset_is_404_and_on_one_class_is_409(client: TestClient) -> None:
    response = client.post("/jobs", json={"dataset_id": 12345, "model": "simple_cnn"})
    assert response.status_code == 404
    dataset_id = int(client.post("/datasets", json={"name": "one"}).json()["id"])
    client.post(
        f"/datasets/{dataset_id}/images", data={"label": "a"}, files=[("files", ("a.png", noise_png(1), "x"))]
    )
    response = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn"})
    assert response.status_code == 409
    assert "at least 2" in response.json()["detail"]


def test_idempotency_key_returns_the_first_job(client: TestClient) -> None:
    dataset_id = upload_digits(client, per_class=2, classes=2)
    spec = {"dataset_id": dataset_id, "model": "simple_cnn"}
    first = client.post("/jobs", json=spec, headers={"Idempotency-Key": "abc"})
    second = client.post("/jobs", json=spec, headers={"Idempotency-Key": "abc"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert len(client.get("/jobs").json()) == 1


def test_unknown_job_is_404_everywhere(client: TestClient) -> None:
    for path in ["/jobs/77", "/jobs/77/metrics", "/jobs/77/checkpoint", "/jobs/77/evaluation"]:
        assert client.get(path).status_code == 404, path
    assert client.post("/jobs/77/cancel").status_code == 404
    response = client.post("/predict", data={"job_id": "77"}, files={"file": ("a.png", noise_png(1), "x")})
    assert response.status_code == 404


def test_predict_and_checkpoint_before_training_are_409(client: TestClient) -> None:
    dataset_id = upload_digits(client, per_class=2, classes=2)
    job = submit(client, dataset_id=dataset_id, model="simple_cnn")
    response = client.post(
        "/predict", data={"job_id": job["id"]}, files={"file": ("a.png", noise_png(1), "x")}
    )
    assert response.status_code == 409
    assert "no checkpoint yet" in response.json()["detail"]
    assert client.get(f"/jobs/{job['id']}/checkpoint").status_code == 409
    assert client.get(f"/jobs/{job['id']}/evaluation").status_code == 409
    assert client.get(f"/jobs/{job['id']}/metrics").json() == {
        "job_id": job["id"],
        "status": "queued",
        "epochs": [],
    }


def test_cancel_queued_job_at_once(client: TestClient, settings: Settings) -> None:
    dataset_id = upload_digits(client, per_class=2, classes=2)
    job = submit(client, dataset_id=dataset_id, model="simple_cnn")
    cancelled = client.post(f"/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 409
    serve(settings, once=True)  # nothing left to claim
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"


def test_worker_trains_a_job_to_the_end(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    dataset_id = upload_digits(client, per_class=30, classes=4)
    job = submit(client, dataset_id=dataset_id, model="simple_cnn", epochs=3, batch_size=32)
    serve(settings, once=True)

    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    assert done["classes"] == ["0", "1", "2", "3"]
    assert done["split_sizes"] == {"train": 84, "val": 24, "test": 12}
    assert done["stop_reason"] == "completed 3 epochs"
    assert done["best"]["metric"] == "val_acc"

    rows = client.get(f"/jobs/{job['id']}/metrics").json()["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert row["train_loss"] > 0 and 0 <= row["val_acc"] <= 1 and row["images_per_second"] > 0
    assert rows[0]["lr"] == pytest.approx(1e-3)
    assert rows[1]["lr"] < rows[0]["lr"]  # cosine schedule
    best_row = max(rows, key=lambda r: r["val_acc"])
    assert done["best"]["value"] == pytest.approx(best_row["val_acc"])

    evaluation = client.get(f"/jobs/{job['id']}/evaluation").json()
    assert evaluation["num_samples"] == 12
    assert evaluation["epoch"] == done["best"]["epoch"]
    assert sum(map(sum, evaluation["confusion_matrix"])) == 12
    assert [c["support"] for c in evaluation["per_class"]] == [3, 3, 3, 3]

    checkpoint = client.get(f"/jobs/{job['id']}/checkpoint")
    assert checkpoint.status_code == 200
    assert checkpoint.headers["content-disposition"].endswith('.safetensors"')
    path = tmp_path / "best.safetensors"
    path.write_bytes(checkpoint.content)
    with safe_open(path, framework="pt") as weights:
        assert "classifier.5.weight" in weights.keys()  # noqa: SIM118
        assert '"classes": ["0", "1", "2", "3"]' in weights.metadata()["trainserve"]

    prediction = client.post(
        "/predict", data={"job_id": job["id"]}, files={"file": ("big.jpg", _rgb_jpeg(300, 200), "image/jpeg")}
    ).json()
    assert set(prediction["scores"]) == {"0", "1", "2", "3"}
    assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)
    assert prediction["epoch"] == done["best"]["epoch"]

    bad = client.post(
        "/predict", data={"job_id": job["id"]}, files={"file": ("x.txt", b"hello", "text/plain")}
    )
    assert bad.status_code == 422
    assert "not a supported image" in bad.json()["detail"]


def test_worker_survives_a_failing_job_and_takes_the_next(client: TestClient, settings: Settings) -> None:
    tiny = int(client.post("/datasets", json={"name": "tiny"}).json()["id"])
    for label, seed in [("a", 1), ("b", 2)]:
        client.post(
            f"/datasets/{tiny}/images",
            data={"label": label},
            files=[("files", ("x.png", noise_png(seed), "x"))],
        )
    failing = submit(client, dataset_id=tiny, model="simple_cnn", epochs=1)
    good_dataset = upload_digits(client, per_class=6, classes=2)
    good = submit(client, dataset_id=good_dataset, model="simple_cnn", epochs=1)

    serve(settings, once=True)
    serve(settings, once=True)

    failed = client.get(f"/jobs/{failing['id']}").json()
    assert failed["status"] == "failed"
    assert "too small to split" in failed["error"]
    assert client.get(f"/jobs/{good['id']}").json()["status"] == "succeeded"


def test_archive_split_is_used_by_the_worker(client: TestClient, settings: Settings) -> None:
    from tests.factories import zip_bytes

    samples = [(label, data) for label, data in digits() if label in {"0", "1"}][:40]
    entries = []
    for i, (label, data) in enumerate(samples):
        split = "train" if i < 30 else ("val" if i < 36 else "test")
        entries.append((f"{split}/{label}/{i}.png", data))
    dataset_id = int(client.post("/datasets", json={"name": "zip"}).json()["id"])
    client.post(f"/datasets/{dataset_id}/archive", files={"file": ("d.zip", zip_bytes(entries), "x")})
    job = submit(client, dataset_id=dataset_id, model="lenet", epochs=1)
    serve(settings, once=True)
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["split_sizes"] == {"train": 30, "val": 6, "test": 4}


def _rgb_jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 200, 90)).save(buffer, "JPEG")
    return buffer.getvalue()
