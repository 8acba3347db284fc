"""API keys: with TRAINSERVE_API_KEYS set, everything but /health and the docs needs a bearer key."""

from __future__ import annotations

import logging
from collections.abc import Iterator

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


def test_401_for_every_protected_route_in_the_schema(locked: TestClient) -> None:
    """No route is forgotten: every operation but /health and the docs refuses a request without a key."""
    schema = locked.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        concrete = path.replace("{dataset_id}", "1").replace("{job_id}", "1").replace("{weights_id}", "1")
        for method in operations:
            response = locked.request(method.upper(), concrete)
            if path == "/health":
                assert response.status_code == 200
            else:
                assert response.status_code == 401, (method, path)
                assert response.headers["www-authenticate"] == "Bearer"


def test_keys_are_never_logged(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(make_settings(sqlite_url, api_keys="sekrit-alpha,sekrit-beta"))) as client:
        client.get("/datasets", headers={"Authorization": "Bearer sekrit-alpha"})
        client.get("/datasets", headers={"Authorization": "Bearer sekrit-wrong"})
        client.post("/datasets", json={"name": "x"}, headers={"Authorization": "Bearer sekrit-wrong"})
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "API keys required" in text
    assert "sekrit" not in text


def test_open_api_warns_loudly_at_startup(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(make_settings(sqlite_url))):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("TRAINSERVE_API_KEYS is not set: the API is OPEN" in r.getMessage() for r in warnings)


def test_body_of_an_unauthorised_upload_is_never_read(locked: TestClient) -> None:
    received: list[int] = []

    def body() -> Iterator[bytes]:
        for _ in range(100):
            received.append(1)
            yield b"x" * 65536

    response = locked.post(
        "/datasets/1/images", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 401
    assert len(received) <= 1, "refused from the headers alone"


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.get("/datasets", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_only_the_configured_origins(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, cors_allow_origins="https://ui.example, https://other.example")
    with TestClient(create_app(settings)) as client:
        allowed = client.get("/datasets", headers={"Origin": "https://ui.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
        denied = client.get("/datasets", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in denied.headers
        preflight = client.options(
            "/jobs",
            headers={
                "Origin": "https://other.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "Authorization, Content-Type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://other.example"
