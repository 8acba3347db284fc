"""An idle worker outlives a database it cannot reach for a while (SQLite locked by a long upload)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from tests.conftest import make_settings
from workers import loop


def test_a_locked_database_while_polling_is_retried_not_fatal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []

    def claim(*_args: object, **_kwargs: object) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        return None  # nothing queued: with once=True the worker then exits

    monkeypatch.setattr(loop, "claim", claim)
    monkeypatch.setattr(loop, "serve_slot", lambda *_args, **_kwargs: False)  # no multi-node jobs either
    assert (
        loop.serve(make_settings(f"sqlite:///{tmp_path}/unused.db", worker_poll_seconds=0.01), once=True) == 0
    )
    assert len(calls) == 3
