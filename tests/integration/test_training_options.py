"""Each job-spec option changes what it should, through the API and the real worker loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.core.config import Settings
from tests.conftest import make_settings
from tests.factories import digits
from workers.loop import serve

FIELDS_THAT_VARY_WITH_TIME = {"seconds", "images_per_second", "data_seconds"}


def digits_dataset(client: TestClient, *, per_class: int, classes: str = "0123") -> int:
    dataset_id = int(client.post("/datasets", json={"name": "digits"}).json()["id"])
    by_label: dict[str, list[bytes]] = {}
    for label, data in digits():
        if label in classes and len(by_label.setdefault(label, [])) < per_class:
            by_label[label].append(data)
    for label, images in by_label.items():
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files)
    return dataset_id


def train(client: TestClient, settings: Settings, **spec: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    response = client.post("/jobs", json={"model": "simple_cnn", "batch_size": 32, **spec})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    serve(settings, once=True)
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    return job, client.get(f"/jobs/{job_id}/metrics").json()["epochs"]


@pytest.fixture
def dataset_id(client: TestClient) -> int:
    return digits_dataset(client, per_class=25)


def test_step_scheduler_and_warmup_lrs_are_in_the_metrics(
    client: TestClient, settings: Settings, dataset_id: int
) -> None:
    _, rows = train(
        client, settings, dataset_id=dataset_id, epochs=4, lr=0.01, scheduler="step", step_size=1, gamma=0.5
    )
    assert [row["lr"] for row in rows] == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    _, rows = train(
        client,
        settings,
        dataset_id=dataset_id,
        epochs=5,
        lr=0.01,
        scheduler="multistep",
        milestones=[3],
        gamma=0.1,
        warmup_epochs=2,
    )
    assert [row["lr"] for row in rows] == pytest.approx([0.005, 0.01, 0.01, 0.001, 0.001])


def test_cosine_restarts_and_onecycle_shape_the_lr(
    client: TestClient, settings: Settings, dataset_id: int
) -> None:
    _, rows = train(
        client,
        settings,
        dataset_id=dataset_id,
        epochs=4,
        lr=0.01,
        scheduler="cosine_restarts",
        restart_epochs=2,
    )
    lrs = [row["lr"] for row in rows]
    assert lrs[0] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.01) and lrs[1] < 0.01
    _, rows = train(client, settings, dataset_id=dataset_id, epochs=3, lr=0.01, scheduler="onecycle")
    lrs = [row["lr"] for row in rows]
    assert lrs[0] < lrs[1]  # one-cycle warms up over its first 30% of steps
    assert max(lrs) <= 0.01


def test_early_stopping_ends_the_job_and_says_why(
    client: TestClient, settings: Settings, dataset_id: int
) -> None:
    job, rows = train(
        client,
        settings,
        dataset_id=dataset_id,
        epochs=20,
        monitor="val_loss",
        min_delta=100.0,
        early_stopping_patience=2,
    )
    assert len(rows) == 3
    assert job["stop_reason"] == "early stopping after epoch 3: val_loss did not improve for 2 epochs"
    assert job["best"]["epoch"] == 1


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(
    client: TestClient, settings: Settings, dataset_id: int
) -> None:
    spec = {"dataset_id": dataset_id, "epochs": 2, "augmentation": "strong", "mixup_alpha": 0.2}
    _, first = train(client, settings, **spec)
    _, second = train(client, settings, **spec)
    _, other = train(client, settings, **spec, seed=1)

    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k not in FIELDS_THAT_VARY_WITH_TIME} for row in rows]

    assert strip(first) == strip(second)
    assert strip(first) != strip(other)


def test_init_from_job_starts_from_the_earlier_weights(client: TestClient, settings: Settings) -> None:
    two = digits_dataset(client, per_class=40, classes="01")
    source, source_rows = train(client, settings, dataset_id=two, epochs=4, lr=0.003)
    assert source_rows[-1]["val_acc"] >= 0.9

    tuned, tuned_rows = train(client, settings, dataset_id=two, epochs=1, lr=1e-7, init_from_job=source["id"])
    _scratch, scratch_rows = train(client, settings, dataset_id=two, epochs=1, lr=1e-7)
    assert tuned_rows[0]["val_acc"] >= 0.9
    assert tuned_rows[0]["val_acc"] > scratch_rows[0]["val_acc"]
    report = tuned["info"]["init"]
    assert report["source"].startswith(f"job {source['id']}")
    assert report["skipped"] == []

    three = digits_dataset(client, per_class=20, classes="012")
    new_head, _ = train(client, settings, dataset_id=three, epochs=1, init_from_job=source["id"])
    report = new_head["info"]["init"]
    assert sorted(report["skipped"]) == ["classifier.5.bias", "classifier.5.weight"]
    assert "features.0.weight" in report["loaded"]


def test_init_from_job_errors(client: TestClient, settings: Settings, dataset_id: int) -> None:
    response = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "init_from_job": 999}
    )
    assert response.status_code == 404
    queued = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn"}).json()
    response = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "init_from_job": queued["id"]}
    )
    assert response.status_code == 409
    response = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "lenet", "init_from_job": queued["id"]}
    )
    assert response.status_code == 422
    assert "same model" in response.json()["detail"]


def test_pretrained_weights_come_from_the_local_torch_cache(
    client: TestClient, settings: Settings, dataset_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    from models.pretrained import pretrained_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = {
        "dataset_id": dataset_id,
        "model": "resnet18",
        "init": "pretrained",
        "image_size": 32,
        "epochs": 1,
    }
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert "never downloads" in response.json()["detail"]

    torch.manual_seed(123)
    imagenet = torchvision.models.resnet18(weights=None)  # stands in for the ImageNet file
    path = pretrained_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    job, _ = train(client, settings, **spec)
    report = job["info"]["init"]
    assert report["source"] == "pretrained"
    assert "layer1.0.conv1.weight" in report["loaded"]
    assert report["adapted"] == ["conv1.weight"]  # RGB filters summed for the grayscale digits
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]


def test_options_are_recorded_and_used(client: TestClient, settings: Settings, dataset_id: int) -> None:
    job, rows = train(
        client,
        settings,
        dataset_id=dataset_id,
        epochs=2,
        optimizer="sgd",
        nesterov=True,
        lr=0.05,
        class_weights="balanced",
        grad_clip_norm=1.0,
        accumulate_steps=2,
        mixed_precision="bf16",
        ema_decay=0.9,
        normalization="dataset",
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        freeze_epochs=1,
    )
    info = job["info"]
    assert info["mixed_precision"] == "bfloat16"
    assert info["effective_batch_size"] == 64
    assert info["class_weights"] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert info["normalization"] == "dataset"
    assert 0.0 < info["mean"][0] < 0.5 and info["std"][0] > 0.1  # digits: mostly dark background
    assert len(rows) == 2


def test_rmsprop_and_adam_train(client: TestClient, settings: Settings, dataset_id: int) -> None:
    for optimizer in ("rmsprop", "adam"):
        _, rows = train(client, settings, dataset_id=dataset_id, epochs=1, optimizer=optimizer, lr=1e-3)
        assert rows[0]["train_loss"] > 0


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"scheduler": "exponential"}, "scheduler"),
        ({"warmup_epochs": 10, "epochs": 10}, "warmup_epochs"),
        ({"freeze_epochs": 5, "epochs": 3}, "freeze_epochs"),
        ({"milestones": [5, 3]}, "milestones"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"accumulate_steps": 0}, "accumulate_steps"),
        ({"augmentation": "extreme"}, "augmentation"),
        ({"init": "pretrained", "model": "simple_cnn"}, "init"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "test_fraction"),
        ({"class_weights": "inverse"}, "class_weights"),
    ],
)
def test_bad_option_values_are_422_naming_the_field(
    client: TestClient, dataset_id: int, spec: dict[str, Any], field: str
) -> None:
    response = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", **spec})
    assert response.status_code == 422, response.text
    assert field in [error["loc"][-1] for error in response.json()["detail"]], response.json()


def test_fp16_on_the_cpu_fails_the_job_with_a_readable_error(
    client: TestClient, settings: Settings, dataset_id: int
) -> None:
    job_id = client.post(
        "/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn", "mixed_precision": "fp16"}
    ).json()["id"]
    serve(settings, once=True)
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert "needs a CUDA device" in job["error"]


def test_a_cpu_job_trains_in_the_step_format_its_trial_chose(
    client: TestClient, settings: Settings, dataset_id: int
) -> None:
    job, rows = train(client, settings, dataset_id=dataset_id, epochs=3)
    info = job["info"]
    chosen = info["step_format"]["chosen"]
    assert chosen in info["step_format"]["images_per_second"]
    assert info["channels_last"] == chosen.startswith("channels_last")
    assert info["mixed_precision"] == ("bfloat16" if chosen.endswith("bfloat16") else "off")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["val_acc"] > 0.5  # it learns


def test_the_trial_can_be_turned_off(client: TestClient, database_url: str, dataset_id: int) -> None:
    settings = make_settings(database_url, cpu_autotune_seconds=0)
    job, _ = train(client, settings, dataset_id=dataset_id, epochs=1)
    assert job["info"]["step_format"] is None
    assert job["info"]["channels_last"] is False
    assert job["info"]["mixed_precision"] == "off"
