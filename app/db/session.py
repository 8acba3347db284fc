"""Sessions: one engine per database URL per process, created on first use (never at import)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.db.engine import SQLITE_BEGIN_OPTION, make_engine

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    with _lock:
        engine = _engines.get(settings.database_url)
        if engine is None:
            engine = make_engine(
                settings.database_url, busy_timeout_seconds=settings.sqlite_busy_timeout_seconds
            )
            _engines[settings.database_url] = engine
        return engine


def session_factory(settings: Settings | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(settings), expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A transaction: committed when the block ends, rolled back on error."""
    with session_factory(settings)() as session, session.begin():
        yield session


@contextmanager
def read_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A read-only transaction: on SQLite it takes no write lock, so it never waits for a writer
    (WAL readers see the last committed state). Writing in it is a bug."""
    engine = get_engine(settings).execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
    with Session(bind=engine, expire_on_commit=False) as session:
        yield session  # closing the session rolls the transaction back


def dispose_engines() -> None:
    """Close every pooled connection (tests, and before a process forks)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
