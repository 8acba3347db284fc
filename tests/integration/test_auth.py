"""API keys: with TRAINSERVE_API_KEYS set, everything but /health and the docs needs a bearer key."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import make_settings


@pytest.fixture
def locked(sqlite_url: str) -> TestClient:
    return TestClient(create_app(make_settings(sqlite_url, api_keys="alpha, beta")))


@pytest.mark.parametrize("path", ["/datasets", "/jobs", "/models", "/jobs/1/metrics"])
def test_protected_endpoints_need_a_valid_key(locked: TestClient, path: str) -> None:
    missing = locked.get(path)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = locked.get(path, headers={"Authorization": "Bearer gamma"})
    assert wrong.status_code == 401
    assert "gamma" not in wrong.text
    assert locked.get(path, headers={"Authorization": "Bearer beta"}).status_code in {200, 404}


def test_uploads_and_predict_are_protected_too(locked: TestClient) -> None:
    assert locked.post("/datasets", json={"name": "x"}).status_code == 401
    assert (
        locked.post(
            "/predict", data={"job_id": "1"}, files={"file": ("a.png", b"x", "image/png")}
        ).status_code
        == 401
    )
    created = locked.post("/datasets", json={"name": "x"}, headers={"Authorization": "Bearer alpha"})
    assert created.status_code == 201


def test_health_and_docs_stay_open(locked: TestClient) -> None:
    assert locked.get("/health").json()["auth"] == "api-key"
    assert locked.get("/docs").status_code == 200
    assert locked.get("/openapi.json").status_code == 200


def test_without_keys_the_api_is_open(client: TestClient) -> None:
    assert client.get("/datasets").status_code == 200
    assert client.get("/health").json()["auth"] == "open"
