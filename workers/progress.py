"""A job's live progress, heartbeats and stop requests, written to the database at a bounded rate.

The training loop calls `JobReporter.update(...)` as often as it likes (every batch); only memory
changes there. A background thread writes the latest snapshot at most once per
`progress_interval_seconds`, and heartbeats every `heartbeat_seconds` even when nothing changed, so a
long validation pass never lets the lease run out. The snapshot is what `GET /jobs/{id}` shows as
`progress` and what the events stream sends:

    phase             caching | training | validating | testing (the worker's), queued/succeeded/... (queue's)
    epoch, epochs     the epoch in progress (1-based) and the planned total
    batch, batches    training batches done in this epoch, and per epoch
    fraction          of the whole job's training done, 0..1
    eta_seconds       time left, from this attempt's own pace (null until it can be estimated)
    images_per_second current training throughput
    updated_at        when the snapshot was taken (UTC, ISO 8601)
    seq               increases with every write (set by `queue.heartbeat`; event streams resume on it)
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from app.core.config import Settings
from app.db.session import session_scope
from app.services import queue

log = logging.getLogger(__name__)


class ProgressEstimator:
    """Derives ETA and throughput from the raw counters the training loop reports."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._start: tuple[float, float] | None = None  # (time, fraction) when this attempt began training
        self._mark: tuple[float, int, int] | None = None  # (time, epoch, images) at the last rate sample

    def derive(self, progress: dict[str, Any]) -> None:
        """Add `eta_seconds` and `images_per_second` to `progress` (in place)."""
        now = self.clock()
        fraction = progress.get("fraction")
        if progress.get("phase") == "training" and fraction is not None:
            if self._start is None:
                self._start = (now, float(fraction))
            started_at, started_fraction = self._start
            done = float(fraction) - started_fraction
            if fraction >= 1:
                progress["eta_seconds"] = 0.0
            elif done > 0 and now > started_at:
                progress["eta_seconds"] = round((now - started_at) * (1 - float(fraction)) / done, 1)
            images, epoch = progress.get("images"), progress.get("epoch")
            if images is not None and epoch is not None:
                mark = self._mark
                if mark is not None and mark[1] == epoch and images > mark[2] and now > mark[0]:
                    rate = (images - mark[2]) / (now - mark[0])
                    # Smoothed: a window of one or two batches jumps with every hiccup of a busy machine.
                    previous = progress.get("images_per_second")
                    smoothed = rate if previous is None else 0.3 * rate + 0.7 * float(previous)
                    progress["images_per_second"] = round(smoothed, 1)
                if mark is None or mark[1] != epoch or images > mark[2]:
                    self._mark = (now, int(epoch), int(images))


class JobReporter:
    """Progress, heartbeats and stop requests for one leased job. Use it as a context manager."""

    def __init__(self, lease: queue.Lease, settings: Settings, shutdown: threading.Event) -> None:
        self.lease = lease
        self.settings = settings
        self.shutdown = shutdown
        self.progress: dict[str, Any] = {}
        self.cancel_requested = False
        self.lease_lost = False
        self._lost: queue.LeaseLost | None = None  # what the background thread was told, kept for the log
        self._estimator = ProgressEstimator()
        self._lock = threading.Lock()  # guards `progress` and `_dirty`
        self._write_lock = threading.Lock()  # one write at a time, so an older snapshot never lands last
        self._dirty = False
        self._last_write = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reporter-{lease.job_id}", daemon=True)

    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = min(self.settings.progress_interval_seconds, self.settings.heartbeat_seconds)
        while not self._stop.wait(interval):
            now = time.monotonic()
            due_progress = self._dirty and now - self._last_write >= self.settings.progress_interval_seconds
            if not due_progress and now - self._last_write < self.settings.heartbeat_seconds:
                continue
            try:
                self._write()
            except queue.LeaseLost as exc:
                self._lost = exc
                self.lease_lost = True
                return
            except Exception:  # a database hiccup: the next round tries again
                log.warning("job %s: progress/heartbeat write failed", self.lease.job_id, exc_info=True)

    def _write(self) -> None:
        with self._write_lock:
            with self._lock:
                snapshot = dict(self.progress) if self._dirty else None
                self._dirty = False
            if snapshot is not None:
                snapshot.pop("images", None)  # an internal counter for the throughput estimate
                snapshot["updated_at"] = datetime.now(UTC).isoformat()
            try:
                with session_scope(self.settings) as session:
                    self.cancel_requested = queue.heartbeat(session, self.lease, progress=snapshot)
            except Exception:
                if snapshot is not None:
                    with self._lock:
                        self._dirty = True
                raise
            self._last_write = time.monotonic()

    def update(self, *, force: bool = False, **fields: Any) -> None:
        """Record progress fields; `force` writes now (phase changes the API should see at once)."""
        with self._lock:
            self.progress.update(fields)
            self._estimator.derive(self.progress)
            self._dirty = True
        if force:
            self._write()

    def stop_reason(self) -> str | None:
        if self.lease_lost:
            raise queue.LeaseLost(str(self._lost or f"job {self.lease.job_id}: the lease was lost"))
        if self.cancel_requested:
            return "cancelled"
        if self.shutdown.is_set():
            return "shutdown"
        return None
