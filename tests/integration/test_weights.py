"""POST /weights: safetensors or PyTorch state dicts in, safetensors stored, never a pickle executed;
`init_from_weights` in a job spec starts training from them."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from app.core.config import Settings
from app.main import create_app
from models.registry import build_model
from tests.conftest import make_settings
from tests.factories import noise_png
from tests.integration.test_training_options import digits_dataset, train


def simple_cnn_state(num_classes: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("simple_cnn", num_classes=num_classes, in_channels=1, image_size=28).state_dict()


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def upload(client: TestClient, data: bytes, name: str = "w.pt") -> Any:
    return client.post("/weights", files={"file": (name, data, "application/octet-stream")})


class WritesAFile:
    """Unpickling this object calls `open(path, "w")`: the file appearing means the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


class RunsAShellCommand:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_safetensors_upload_is_stored_and_listed(client: TestClient) -> None:
    state = simple_cnn_state()
    data = save_safetensors({k: v.contiguous() for k, v in state.items()})
    response = upload(client, data, "init.safetensors")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["source_format"] == "safetensors"
    assert body["filename"] == "init.safetensors"
    assert body["num_tensors"] == len(state)
    assert body["num_parameters"] == sum(v.numel() for v in state.values())
    assert body["size_bytes"] == len(data)
    assert body["architecture"] is None
    assert client.get(f"/weights/{body['id']}").json() == body
    assert [w["id"] for w in client.get("/weights").json()] == [body["id"]]
    assert client.get("/weights/999").status_code == 404


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model_state_dict": s, "epoch": 7, "optimizer": {"lr": 0.1}},
        lambda s: {f"module.{k}": v for k, v in s.items()},
    ],
    ids=["state_dict", "checkpoint_dict", "dataparallel_prefix"],
)
def test_pytorch_state_dicts_are_converted_to_safetensors(
    client: TestClient, settings: Settings, wrap: Any
) -> None:
    from app.db.session import read_scope
    from app.services.weights import get_weights

    state = simple_cnn_state(seed=3)
    response = upload(client, torch_bytes(wrap(state)))
    assert response.status_code == 201, response.text
    assert response.json()["source_format"] == "pytorch"
    with read_scope(settings) as session:
        stored = load_safetensors(get_weights(session, response.json()["id"], with_data=True).data)
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[k], state[k]) for k in state)


def test_code_executing_pickles_are_refused_and_never_run(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    # The payloads really do run when unpickled the unsafe way: the control proves the test can fail.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(WritesAFile(control)))
    assert control.exists()

    payloads = {
        "torch.save of open(...)": lambda p: torch_bytes({"weight": torch.zeros(2), "x": WritesAFile(p)}),
        "torch.save of os.system": lambda p: torch_bytes(RunsAShellCommand(p)),
        "plain pickle of open(...)": lambda p: pickle.dumps({"w": WritesAFile(p)}, protocol=2),
        "legacy torch format": lambda p: torch_bytes_legacy(WritesAFile(p)),
    }
    for name, make in payloads.items():
        marker = tmp_path / f"pwned-{len(name)}-{abs(hash(name))}"
        response = upload(client, make(marker), "evil.pth")
        assert response.status_code == 422, (name, response.text)
        assert "weights_only" in response.json()["detail"], name
        assert not marker.exists(), f"{name}: the payload ran"
    assert client.get("/weights").json() == []


def torch_bytes_legacy(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x00" * 64, "refused"),
        (noise_png(1), "refused"),
        (b'{"weight": [1, 2, 3]}', "refused"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "safetensors"),
        (torch_bytes([torch.zeros(3)]), "not a state dict"),
        (torch_bytes({"epoch": 3}), "no tensors"),
    ],
    ids=["empty", "zeros", "png", "json", "broken_safetensors", "list", "no_tensors"],
)
def test_files_that_are_not_weights_are_422(client: TestClient, data: bytes, reason: str) -> None:
    response = upload(client, data)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]
    assert client.get("/weights").json() == []


def test_weights_over_the_limit_are_413_with_the_limit(sqlite_url: str) -> None:
    with TestClient(create_app(make_settings(sqlite_url, max_weights_bytes=10_000))) as client:
        big = torch_bytes({"w": torch.zeros(10_000)})
        response = upload(client, big)
        assert response.status_code == 413
        assert "10000" in response.json()["detail"]
        assert client.get("/weights").json() == []


def test_init_from_weights_errors(client: TestClient) -> None:
    dataset_id = digits_dataset(client, per_class=5, classes="01")
    spec = {"dataset_id": dataset_id, "model": "simple_cnn"}
    missing = client.post("/jobs", json={**spec, "init_from_weights": 999})
    assert missing.status_code == 404
    assert "init_from_weights" in missing.json()["detail"]
    both = client.post("/jobs", json={**spec, "init_from_weights": 1, "init_from_job": 1})
    assert both.status_code == 422
    assert both.json()["detail"][0]["loc"] == ["body", "init_from_weights"]
    assert client.post("/jobs", json={**spec, "init_from_weights": 0}).status_code == 422

    from models.checkpoint import state_dict_to_bytes

    tagged = state_dict_to_bytes(simple_cnn_state(), {"architecture": "simple_cnn", "classes": ["0", "1"]})
    weights = upload(client, tagged, "job.safetensors").json()
    assert weights["architecture"] == "simple_cnn"
    wrong = client.post("/jobs", json={**spec, "model": "lenet", "init_from_weights": weights["id"]})
    assert wrong.status_code == 422
    assert "simple_cnn" in wrong.json()["detail"]


def test_training_starts_from_uploaded_weights(client: TestClient, settings: Settings) -> None:
    two = digits_dataset(client, per_class=40, classes="01")
    source, source_rows = train(client, settings, dataset_id=two, epochs=4, lr=0.003)
    assert source_rows[-1]["val_acc"] >= 0.9
    # What a user has from elsewhere: a .pt state dict (here the job's checkpoint, re-saved with torch).
    checkpoint = load_safetensors(client.get(f"/jobs/{source['id']}/checkpoint").content)
    weights = upload(client, torch_bytes(checkpoint), "mine.pt").json()

    tuned, tuned_rows = train(
        client, settings, dataset_id=two, epochs=1, lr=1e-7, init_from_weights=weights["id"]
    )
    _scratch, scratch_rows = train(client, settings, dataset_id=two, epochs=1, lr=1e-7)
    assert tuned_rows[0]["val_acc"] >= 0.9
    assert tuned_rows[0]["val_acc"] > scratch_rows[0]["val_acc"]
    assert tuned["info"]["init"]["source"] == f"weights {weights['id']}"
    assert tuned["info"]["init"]["skipped"] == []

    three = digits_dataset(client, per_class=10, classes="012")
    new_head, _ = train(client, settings, dataset_id=three, epochs=1, init_from_weights=weights["id"])
    report = new_head["info"]["init"]
    assert sorted(report["skipped"]) == ["classifier.5.bias", "classifier.5.weight"]
    assert "features.0.weight" in report["loaded"]


def test_weights_that_fit_nothing_fail_the_job_with_a_reason(client: TestClient, settings: Settings) -> None:
    from workers.loop import serve

    dataset_id = digits_dataset(client, per_class=5, classes="01")
    weights = upload(client, torch_bytes({"unrelated.weight": torch.zeros(3, 3)})).json()
    job = client.post(
        "/jobs",
        json={
            "dataset_id": dataset_id,
            "model": "simple_cnn",
            "epochs": 1,
            "init_from_weights": weights["id"],
        },
    ).json()
    serve(settings, once=True)
    failed = client.get(f"/jobs/{job['id']}").json()
    assert failed["status"] == "failed"
    assert "no tensor" in failed["error"]
