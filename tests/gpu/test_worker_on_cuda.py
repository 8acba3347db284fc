"""The worker loop on the GPU in this process, where its process-wide CUDA settings can be seen: a
dataset too large for the GPU's share (TRAINSERVE_DEVICE_DATA_FRACTION=0) is prefetched through pinned
host buffers and trains as well, and the job turned on cudnn.benchmark."""

from __future__ import annotations

import math

import torch
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import make_settings
from tests.factories import digits
from tests.gpu import cuda
from workers.loop import serve

pytestmark = cuda.REQUIRED


@cuda.cudnn_benchmark(False)  # the job turns it on
def test_data_that_does_not_fit_trains_through_pinned_prefetch_with_cudnn_benchmark(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, device="cuda", device_data_fraction=0.0)
    with TestClient(create_app(settings)) as client:
        dataset_id = client.post("/datasets", json={"name": "digits"}).json()["id"]
        by_label: dict[str, list[bytes]] = {}
        for label, data in digits():
            by_label.setdefault(label, []).append(data)
        for label, images in by_label.items():
            files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
            response = client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files)
            assert response.status_code == 201, response.text
        spec = {"dataset_id": dataset_id, "model": "simple_cnn", "epochs": 2, "batch_size": 64}
        job_id = client.post("/jobs", json=spec).json()["id"]
        serve(settings, once=True)
        job = client.get(f"/jobs/{job_id}").json()
        rows = client.get(f"/jobs/{job_id}/metrics").json()["epochs"]
    assert job["status"] == "succeeded", job
    assert job["info"]["data_placement"] == "pinned host buffers, prefetched", job["info"]
    assert job["info"]["device"].startswith("cuda") and job["info"]["channels_last"] is True
    assert torch.backends.cudnn.benchmark is True  # set by the job for its fixed input shapes
    assert len(rows) == 2 and all(math.isfinite(row["train_loss"]) for row in rows)
    assert rows[-1]["val_acc"] > 0.5, rows  # chance is 0.1
    assert rows[-1]["data_seconds"] >= 0
