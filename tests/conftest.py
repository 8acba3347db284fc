"""Fixtures: a migrated SQLite file per test, the app over it, and PostgreSQL where one is configured."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.core.config import Settings
from app.db.session import dispose_engines
from app.main import create_app
from migrations import upgrade_to_head

# A PostgreSQL server URL (the database named in it is only used to create a fresh one per test).
POSTGRES_URL_ENV = "TRAINSERVE_TEST_DATABASE_URL"

# The container test builds a multi-gigabyte image: `make test-container` runs it by naming the directory;
# a plain `pytest` (`make test`) leaves it out.
CONTAINER_TESTS = Path(__file__).parent / "container"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path != CONTAINER_TESTS:
        return None
    named = (Path(arg.split("::")[0]).resolve() for arg in config.args)
    return None if any(path.is_relative_to(CONTAINER_TESTS) for path in named) else True


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "device": "cpu",
        "worker_poll_seconds": 0.1,
        "progress_interval_seconds": 0.2,
        "allowed_hosts": ["testserver", "localhost", "127.0.0.1"],  # TestClient's Host is `testserver`
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Tests never read the developer's TRAINSERVE_* settings, never share pooled connections, and
    each has its own decoded-image cache (worker processes it starts inherit the setting)."""
    for name in list(os.environ):
        if name.startswith("TRAINSERVE_") and name != POSTGRES_URL_ENV:
            monkeypatch.delenv(name)
    monkeypatch.setenv("TRAINSERVE_CACHE_DIR", str(tmp_path / "decoded-cache"))
    yield
    dispose_engines()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'trainserve.db'}"
    upgrade_to_head(url)
    return url


# The API, worker and service tests run on SQLite always, and on PostgreSQL too when it is configured.
DATABASES = ["sqlite", "postgresql"] if os.environ.get(POSTGRES_URL_ENV) else ["sqlite"]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@contextmanager
def scratch_postgres_database(base: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of `base` for one test or module, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database per test, dropped afterwards (skipped without a server URL)."""
    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (CI sets it; see .ci/run)")
    with scratch_postgres_database(base, "trainserve_test") as url:
        upgrade_to_head(url)
        yield url
