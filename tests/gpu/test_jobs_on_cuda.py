"""Jobs on the GPU through `trainserve up` (the API and a real worker process with TRAINSERVE_DEVICE=cuda):
the dataset kept in GPU memory, channels_last, bf16 autocast and fp16 through the grad scaler, serving the
checkpoint on the GPU with the CPU's scores, and a 2-rank nccl job where 2 GPUs are visible."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from migrations import upgrade_to_head
from models.predictor import Predictor
from models.preprocessing import decode_image
from tests.e2e import processes
from tests.factories import digits
from tests.gpu import cuda

pytestmark = cuda.REQUIRED

HELD_OUT = 40  # digits kept out of the dataset and sent to /predict


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """`trainserve up` on the GPU over a fresh SQLite file, with the digits uploaded once."""
    tmp = tmp_path_factory.mktemp("gpu-service")
    url = f"sqlite:///{tmp / 'trainserve.db'}"
    upgrade_to_head(url)
    with processes.trainserve_up(
        url, tmp / "up.log", TRAINSERVE_DEVICE="cuda", TRAINSERVE_CACHE_DIR=str(tmp / "cache")
    ) as (client, _process):
        yield client


@pytest.fixture(scope="module")
def dataset_id(service: httpx.Client) -> int:
    dataset = int(service.post("/datasets", json={"name": "digits"}).json()["id"])
    by_label: dict[str, list[bytes]] = {}
    for label, data in digits()[:-HELD_OUT]:
        by_label.setdefault(label, []).append(data)
    for label, images in by_label.items():
        files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        response = service.post(f"/datasets/{dataset}/images", data={"label": label}, files=files)
        assert response.status_code == 201, response.text
    return dataset


def train(
    client: httpx.Client, timeout: float = 300, **spec: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    response = client.post("/jobs", json={"model": "simple_cnn", "epochs": 2, "batch_size": 64, **spec})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/jobs/{job_id}").json())["status"] not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}: {job['progress']}"
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    return job, client.get(f"/jobs/{job_id}/metrics").json()["epochs"]


def assert_it_learned(rows: list[dict[str, Any]], epochs: int = 2) -> None:
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in rows), rows
    assert rows[-1]["val_acc"] > 0.5, rows  # chance is 0.1


@pytest.fixture(scope="module")
def auto_job(service: httpx.Client, dataset_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return train(service, dataset_id=dataset_id, devices=1)


def test_a_job_trains_on_the_gpu_with_its_data_in_gpu_memory_channels_last_and_autocast(
    auto_job: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    job, rows = auto_job
    info = job["info"]
    dtype, scaler = cuda.bf16_autocast()
    assert info["device"].startswith("cuda"), info
    assert info["data_placement"] == "resident on the device", info
    assert info["channels_last"] is True and info["step_format"] is None  # no CPU trial on the GPU
    assert (info["mixed_precision"], info["grad_scaler"]) == (dtype, scaler)
    assert info["world_size"] == 1
    assert_it_learned(rows)
    assert all(row["images_per_second"] > 0 for row in rows)


def test_fp16_trains_through_the_grad_scaler(service: httpx.Client, dataset_id: int) -> None:
    job, rows = train(service, dataset_id=dataset_id, mixed_precision="fp16", devices=1)
    assert (job["info"]["mixed_precision"], job["info"]["grad_scaler"]) == ("float16", True)
    assert_it_learned(rows)


def test_plain_fp32_trains_too(service: httpx.Client, dataset_id: int) -> None:
    job, rows = train(service, dataset_id=dataset_id, mixed_precision="off")
    assert (job["info"]["mixed_precision"], job["info"]["grad_scaler"]) == ("off", False)
    assert job["info"]["channels_last"] is True
    assert_it_learned(rows)


def test_the_api_serves_the_checkpoint_on_the_gpu_with_the_cpu_s_scores(
    service: httpx.Client, auto_job: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    job, _ = auto_job
    checkpoint = service.get(f"/jobs/{job['id']}/checkpoint")
    assert checkpoint.status_code == 200
    on_cpu = Predictor(checkpoint.content)
    held_out = digits()[-HELD_OUT:]
    right = 0
    for label, png in held_out:
        response = service.post(
            "/predict", data={"job_id": str(job["id"])}, files={"file": ("digit.png", png, "image/png")}
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = on_cpu.predict(decode_image(png))
        assert answer["scores"].keys() == expected.keys()
        for name, score in expected.items():
            assert answer["scores"][name] == pytest.approx(score, abs=5e-3), (name, answer, expected)
        right += answer["label"] == label
    assert right > HELD_OUT // 2, f"{right} of {HELD_OUT} held-out digits right"


@cuda.gpus(2)
def test_two_gpus_train_one_job_over_nccl(service: httpx.Client, dataset_id: int) -> None:
    job, rows = train(service, dataset_id=dataset_id, devices=2)
    info = job["info"]
    assert (info["world_size"], info["devices_per_node"], info["backend"]) == (2, 2, "nccl"), info
    assert info["data_placement"] == "resident on the device"
    assert_it_learned(rows)
