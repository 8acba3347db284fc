"""Capture the worker's log records while it runs a job and store them with the job, in batches.

A `logging.Handler` on the root logger buffers formatted lines; a background thread writes the buffer
every `job_log_flush_seconds` in one insert, so logging never costs a database round trip per line and
never blocks the training loop on a lock.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from app.core.config import Settings
from app.db.session import session_scope
from app.services import joblogs
from app.services.queue import Lease

log = logging.getLogger(__name__)

# Records from the database layer would describe (and, written back, feed) our own writes.
_IGNORED_PREFIXES = ("sqlalchemy", "alembic")


class _BufferHandler(logging.Handler):
    def __init__(self, capture: JobLogCapture, level: int) -> None:
        super().__init__(level)
        self.capture = capture
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(_IGNORED_PREFIXES) or threading.current_thread() is self.capture.thread:
            return
        try:
            message = self.format(record)
        except Exception:  # a bad format string must not break training
            self.handleError(record)
            return
        limit = self.capture.settings.job_log_max_line_chars
        if len(message) > limit:
            message = message[: limit - 15] + " …[truncated]"
        line = joblogs.LogLine(
            created_at=datetime.fromtimestamp(record.created, UTC),
            level=record.levelname,
            logger=record.name,
            message=message,
        )
        with self.capture.lock:
            self.capture.buffer.append(line)


class JobLogCapture:
    """Context manager: while open, this process's log records (at `job_log_level` and above) are
    stored as the job's log lines. `flush()` writes what is buffered now."""

    def __init__(self, lease: Lease, settings: Settings) -> None:
        self.lease = lease
        self.settings = settings
        self.lock = threading.Lock()
        self.buffer: list[joblogs.LogLine] = []
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._handler = _BufferHandler(self, logging.getLevelName(settings.job_log_level))
        self.thread = threading.Thread(target=self._run, name=f"joblog-{lease.job_id}", daemon=True)
        self._root_level: int | None = None

    def __enter__(self) -> JobLogCapture:
        root = logging.getLogger()
        root.addHandler(self._handler)
        # The root logger's own level would drop INFO records before any handler sees them.
        if root.level > self._handler.level or root.level == logging.NOTSET:
            self._root_level = root.level
            root.setLevel(self._handler.level)
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self._handler)
        if self._root_level is not None:
            root.setLevel(self._root_level)
        self._stop.set()
        self.thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.job_log_flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines in one transaction; on a database error they wait for the next try."""
        with self._write_lock:
            with self.lock:
                lines, self.buffer = self.buffer, []
            if not lines:
                return
            try:
                with session_scope(self.settings) as session:
                    joblogs.append_lines(
                        session,
                        job_id=self.lease.job_id,
                        attempt=self.lease.attempt,
                        lines=lines,
                        keep=self.settings.job_log_max_lines,
                    )
            except Exception:
                with self.lock:
                    # Keep them for the next flush, but never more than the job would keep anyway.
                    self.buffer = (lines + self.buffer)[-self.settings.job_log_max_lines :]
                # From the flush thread this line is not captured (see emit), so it cannot loop.
                log.warning("job %s: could not store log lines; retrying", self.lease.job_id, exc_info=True)
