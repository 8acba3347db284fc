"""Dynamic batching: concurrent requests for one model share a forward pass that runs in a thread.

The policy that keeps both latency and throughput: an idle model runs a request at once (a lone client
never waits for batch-mates); while a pass runs, new requests queue, and the next pass takes up to
`max_batch_size` of them as soon as a slot frees. With more than one slot (`concurrency`), a free slot
waits at most `max_wait_seconds` for a fuller batch while another pass is still running.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# One result per item: the value, or the exception that failed only that item.
BatchFn = Callable[[list[T]], Sequence["R | BaseException"]]


class DynamicBatcher(Generic[T, R]):
    """Collects items submitted from the event loop into batches for `run`, called in `executor`."""

    def __init__(
        self,
        run: BatchFn[T, R],
        *,
        executor: Executor,
        max_batch_size: int = 32,
        max_wait_seconds: float = 0.005,
        concurrency: int = 1,
    ) -> None:
        if max_batch_size < 1 or concurrency < 1 or max_wait_seconds < 0:
            raise ValueError("max_batch_size and concurrency must be >= 1, max_wait_seconds >= 0")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait_seconds = max_wait_seconds
        self.concurrency = concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self.batches_run = 0  # for tests and diagnostics
        self.largest_batch = 0

    async def submit(self, item: T) -> R:
        """The result for one item; its own exception if it failed."""
        return await self._enqueue([item])[0]

    async def submit_many(self, items: Sequence[T]) -> list[R | BaseException]:
        """Results in order; a failed item gives its exception in place, the others still succeed."""
        futures = self._enqueue(items)
        return list(await asyncio.gather(*futures, return_exceptions=True))

    def _enqueue(self, items: Sequence[T]) -> list[asyncio.Future[R]]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new event loop (a test client that starts one per call): the old one's queue is dead.
            self._loop, self._queue, self._running, self._timer = loop, deque(), 0, None
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._queue.extend(zip(items, futures, strict=True))
        self._dispatch()
        return futures

    def _dispatch(self) -> None:
        """Start passes while a slot is free and something waits; see the module docstring."""
        while self._running < self.concurrency and self._queue:
            if self._running and len(self._queue) < self.max_batch_size and self.max_wait_seconds > 0:
                if self._timer is None:
                    self._timer = self._loop_or_fail().call_later(self.max_wait_seconds, self._on_timer)
                return
            self._start_pass()

    def _on_timer(self) -> None:
        self._timer = None
        while self._running < self.concurrency and self._queue:
            self._start_pass()

    def _start_pass(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # a client that went away (cancelled) costs nothing
                batch.append((item, future))
        if not batch:
            return
        self._running += 1
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        loop = self._loop_or_fail()
        pending = loop.run_in_executor(self._executor, self._run, [item for item, _ in batch])
        pending.add_done_callback(lambda done: self._finish(loop, batch, done))

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[T, asyncio.Future[R]]],
        done: asyncio.Future[Sequence[R | BaseException]],
    ) -> None:
        if loop is not self._loop:
            return  # a pass of a loop that is gone
        self._running -= 1
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        results = done.result() if error is None else [error] * len(batch)
        if len(results) != len(batch):
            results = [RuntimeError("batch function returned the wrong number of results")] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._dispatch()

    def _loop_or_fail(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:  # pragma: no cover - only reachable through _enqueue
            raise RuntimeError("batcher used outside an event loop")
        return self._loop
