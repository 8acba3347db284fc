"""A fresh database for a module's live server: a SQLite file, or a new PostgreSQL database when
TRAINSERVE_TEST_DATABASE_URL names a server (dropped afterwards)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import POSTGRES_URL_ENV, scratch_postgres_database

KINDS = ["sqlite", "postgresql"] if os.environ.get(POSTGRES_URL_ENV) else ["sqlite"]


@contextmanager
def fresh_database(kind: str, folder: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'db.sqlite'}"
        return
    with scratch_postgres_database(os.environ[POSTGRES_URL_ENV], "trainserve_e2e") as url:
        yield url
