"""Jobs with a best checkpoint, written through the same service calls the worker makes, so prediction
tests need no training run (the weights are a seeded random initialisation of the real architecture)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fastapi.testclient import TestClient
from httpx import Client

from app.core.config import Settings
from app.db.session import session_scope
from app.db.tables import CheckpointKind
from app.services.queue import Lease, claim_next_job, start_attempt, store_checkpoint
from models.checkpoint import read_metadata, state_dict_to_bytes
from models.preprocessing import Preprocessing
from models.registry import build_model
from tests.factories import noise_png

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@dataclass
class ServedJob:
    job_id: int
    lease: Lease
    weights: bytes


def checkpoint_bytes(
    *, seed: int, architecture: str = "simple_cnn", image_size: int = 28, channels: int = 1
) -> bytes:
    torch.manual_seed(seed)
    model = build_model(architecture, num_classes=len(CLASSES), in_channels=channels, image_size=image_size)
    preprocessing = Preprocessing.for_channels(
        image_size=image_size, channels=channels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    meta = {"architecture": architecture, "classes": CLASSES, "preprocessing": preprocessing.to_meta()}
    return state_dict_to_bytes(model.eval().state_dict(), meta)


def queued_job(client: TestClient | Client) -> int:
    """A queued simple_cnn job over a tiny two-class dataset, through the HTTP API."""
    dataset_id = client.post("/datasets", json={"name": "tiny"}).json()["id"]
    for label, seed in [("a", 1), ("b", 2)]:
        files = [("files", (f"{label}.png", noise_png(seed), "image/png"))]
        assert (
            client.post(f"/datasets/{dataset_id}/images", data={"label": label}, files=files).status_code
            == 201
        )
    response = client.post("/jobs", json={"dataset_id": dataset_id, "model": "simple_cnn"})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def claim_with_best(settings: Settings, *, epoch: int = 1, seed: int = 0) -> ServedJob:
    """Claim the oldest queued job as a worker would and store a best checkpoint for it."""
    with session_scope(settings) as session:
        lease = claim_next_job(session, worker_id="test-worker")
        assert lease is not None, "no queued job to claim"
        start_attempt(session, lease, classes=CLASSES, split_sizes={"train": 1, "val": 1, "test": 0})
    return ServedJob(lease.job_id, lease, store_best(settings, lease, epoch=epoch, seed=seed))


def store_best(settings: Settings, lease: Lease, *, epoch: int, seed: int) -> bytes:
    """A new best checkpoint for a running job: what the worker does when validation improves."""
    weights = checkpoint_bytes(seed=seed)
    with session_scope(settings) as session:
        store_checkpoint(
            session,
            lease,
            kind=CheckpointKind.best,
            epoch=epoch,
            metric="val_acc",
            value=0.5,
            meta=read_metadata(weights),
            weights=weights,
        )
    return weights
