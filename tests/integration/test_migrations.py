"""`trainserve migrate` as a real process, and the ORM metadata against what the migrations build.

SQLite always; PostgreSQL where TRAINSERVE_TEST_DATABASE_URL is set (the `postgres` params skip otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

import app.db.tables  # noqa: F401  (registers every table on Base.metadata)
from app.db.base import Base
from migrations import alembic_config, current_revision, upgrade_to_head
from tests.conftest import POSTGRES_URL_ENV, scratch_postgres_database

ROOT = Path(__file__).resolve().parents[2]
ORM_TABLES = frozenset(Base.metadata.tables)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def run_migrate(database_url: str) -> subprocess.CompletedProcess[str]:
    """`trainserve migrate` in a child process, configured only through the environment."""
    script = Path(sys.executable).parent / "trainserve"
    argv = [str(script), "migrate"] if script.exists() else [sys.executable, "-m", "app.cli", "migrate"]
    env = {name: value for name, value in os.environ.items() if not name.startswith("TRAINSERVE_")}
    env["TRAINSERVE_DATABASE_URL"] = database_url
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def schema_snapshot(database_url: str) -> dict[str, Any]:
    """Tables, columns, keys and indexes as the database reports them (comparable between runs)."""
    engine = create_engine(database_url)
    try:
        inspector = inspect(engine)
        snapshot: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            snapshot[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                    for c in inspector.get_columns(table)
                ],
                "pk": inspector.get_pk_constraint(table),
                "fks": sorted(inspector.get_foreign_keys(table), key=lambda fk: str(fk["name"])),
                "indexes": sorted(inspector.get_indexes(table), key=lambda ix: str(ix["name"])),
                "uniques": sorted(inspector.get_unique_constraints(table), key=lambda uq: str(uq["name"])),
            }
        return snapshot
    finally:
        engine.dispose()


def metadata_diff(database_url: str) -> list[Any]:
    """What autogenerate would write into a new migration: empty when ORM and migrations agree."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def query(database_url: str, sql: str) -> list[Any]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql)).all())
    finally:
        engine.dispose()


def insert_dataset(database_url: str, name: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO dataset (name, created_at) VALUES (:name, CURRENT_TIMESTAMP)"),
                {"name": name},
            )
    finally:
        engine.dispose()


@pytest.fixture
def blank_postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database (no tables, no alembic_version), dropped afterwards."""
    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (CI sets it; see .ci/run)")
    with scratch_postgres_database(base, "trainserve_test_blank") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database that has never been migrated."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh' / 'trainserve.db'}"  # the folder does not exist yet
    return str(request.getfixturevalue("blank_postgres_url"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def migrated_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url"))


def test_migrate_creates_every_table_then_a_second_run_is_a_no_op(blank_url: str) -> None:
    if blank_url.startswith("sqlite"):
        assert not Path(make_url(blank_url).database or "").exists()
    else:
        assert current_revision(blank_url) is None

    first = run_migrate(blank_url)

    assert first.returncode == 0, first.stderr
    assert "Running upgrade" in first.stderr + first.stdout  # so its absence below means something
    assert current_revision(blank_url) == head_revision()
    migrated = schema_snapshot(blank_url)
    assert set(migrated) == ORM_TABLES | {"alembic_version"}
    assert query(blank_url, "SELECT version_num FROM alembic_version") == [(head_revision(),)]

    insert_dataset(blank_url, "survivor")
    again = run_migrate(blank_url)

    assert again.returncode == 0, again.stderr
    assert "Running upgrade" not in again.stderr + again.stdout
    assert current_revision(blank_url) == head_revision()
    assert schema_snapshot(blank_url) == migrated
    assert query(blank_url, "SELECT name FROM dataset") == [("survivor",)]
    assert query(blank_url, "SELECT count(*) FROM alembic_version") == [(1,)]


def test_orm_metadata_matches_the_migrations(migrated_url: str) -> None:
    assert current_revision(migrated_url) == head_revision()
    assert metadata_diff(migrated_url) == []


def test_metadata_diff_notices_a_drifted_schema(sqlite_url: str) -> None:
    """The comparison above would catch drift: drop an index the ORM declares and it shows up."""
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_training_job_status_id"))
    engine.dispose()
    diff = metadata_diff(sqlite_url)
    assert [(op[0], op[1].name) for op in diff] == [("add_index", "ix_training_job_status_id")]


def test_downgrade_to_base_then_upgrade_to_head_on_sqlite(sqlite_url: str) -> None:
    migrated = schema_snapshot(sqlite_url)
    config = alembic_config(sqlite_url)

    command.downgrade(config, "base")

    assert current_revision(sqlite_url) is None
    assert set(schema_snapshot(sqlite_url)) <= {"alembic_version"}

    upgrade_to_head(sqlite_url)

    assert current_revision(sqlite_url) == head_revision()
    assert schema_snapshot(sqlite_url) == migrated
    assert metadata_diff(sqlite_url) == []


def test_every_revision_steps_down_and_up_on_sqlite(sqlite_url: str) -> None:
    """Each migration's downgrade undoes exactly its upgrade (one step at a time, head to base)."""
    config = alembic_config(sqlite_url)
    revisions = [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()]
    snapshots = {}
    for revision in revisions:  # newest first
        assert current_revision(sqlite_url) == revision
        snapshots[revision] = schema_snapshot(sqlite_url)
        command.downgrade(config, "-1")
    assert current_revision(sqlite_url) is None
    for revision in reversed(revisions):
        command.upgrade(config, "+1")
        assert current_revision(sqlite_url) == revision
        assert schema_snapshot(sqlite_url) == snapshots[revision]


def test_stepping_down_and_up_keeps_rows_that_reference_rebuilt_tables_on_sqlite(sqlite_url: str) -> None:
    """Batch mode rebuilds a SQLite table by dropping the original; with foreign keys enforced that
    DROP would first delete every referencing row (ON DELETE CASCADE), silently losing data."""
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        for sql in (
            "INSERT INTO dataset (id, name, created_at) VALUES (1, 'd', '2026-01-01 00:00:00')",
            "INSERT INTO image (dataset_id, sha256, label, filename, format, mode, width, height, "
            "size_bytes, data, created_at) VALUES (1, 'ab', 'cat', 'a.png', 'PNG', 'L', 1, 1, 1, x'00', "
            "'2026-01-01 00:00:00')",
            "INSERT INTO training_job (id, dataset_id, spec, status, progress, cancel_requested, attempts, "
            "created_at) VALUES (1, 1, '{}', 'succeeded', '{}', 0, 1, '2026-01-01 00:00:00')",
            "INSERT INTO epoch_metric (job_id, epoch, train_loss, train_acc, lr, seconds, "
            "images_per_second, created_at) VALUES (1, 1, 0.5, 0.5, 0.1, 1, 1, '2026-01-01 00:00:00')",
            "INSERT INTO checkpoint (job_id, kind, epoch, meta, weights, size_bytes, created_at) "
            "VALUES (1, 'best', 1, '{}', x'00', 1, '2026-01-01 00:00:00')",
        ):
            connection.execute(text(sql))
    engine.dispose()
    counts = "SELECT (SELECT count(*) FROM dataset), (SELECT count(*) FROM image), " + ", ".join(
        f"(SELECT count(*) FROM {table})" for table in ("training_job", "epoch_metric", "checkpoint")
    )
    assert query(sqlite_url, counts) == [(1, 1, 1, 1, 1)]
    config = alembic_config(sqlite_url)

    command.downgrade(config, "-1")
    assert query(sqlite_url, counts) == [(1, 1, 1, 1, 1)]
    upgrade_to_head(sqlite_url)

    assert query(sqlite_url, counts) == [(1, 1, 1, 1, 1)]
    assert query(sqlite_url, "PRAGMA foreign_key_check") == []
