"""The dynamic batcher: a lone request runs at once, requests that arrive during a pass share the next
one, batches never exceed the maximum, and one failed item fails only itself."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.services.batching import DynamicBatcher


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4)
    yield pool
    pool.shutdown(wait=True)


class Recorder:
    """A batch function that records each batch and can hold the first pass until released."""

    def __init__(self, *, hold_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        # The first pass holds until released; later passes run straight through.

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.started.set()
            self.release.wait(timeout=30)
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


async def wait_started(recorder: Recorder) -> None:
    assert await asyncio.to_thread(recorder.started.wait, 30)


def test_a_lone_request_runs_at_once_without_waiting_for_batch_mates(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    # A 60-second max wait: the test could only pass in time if an idle batcher never waits.
    batcher = DynamicBatcher(recorder, executor=executor, max_batch_size=32, max_wait_seconds=60)

    async def scenario() -> int:
        return await asyncio.wait_for(batcher.submit(7), timeout=20)

    assert asyncio.run(scenario()) == 70
    assert recorder.batches == [[7]]


def test_requests_arriving_during_a_pass_share_the_next_one(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder(hold_first=True)
    batcher = DynamicBatcher(recorder, executor=executor, max_batch_size=32)

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_started(recorder)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 7)]
        await asyncio.sleep(0.05)
        recorder.release.set()
        return [await first, *[await r for r in rest]]

    assert asyncio.run(scenario()) == [10, 20, 30, 40, 50, 60]
    assert recorder.batches == [[1], [2, 3, 4, 5, 6]]
    assert batcher.largest_batch == 5


def test_batches_never_exceed_the_maximum(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder(hold_first=True)
    batcher = DynamicBatcher(recorder, executor=executor, max_batch_size=4)

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(batcher.submit(0))
        await wait_started(recorder)
        rest = asyncio.ensure_future(batcher.submit_many(list(range(1, 11))))
        await asyncio.sleep(0.05)
        recorder.release.set()
        await first
        return list(await rest)  # type: ignore[arg-type]

    assert asyncio.run(scenario()) == [i * 10 for i in range(1, 11)]
    assert [len(b) for b in recorder.batches] == [1, 4, 4, 2]


def test_a_failed_item_fails_only_itself(executor: ThreadPoolExecutor) -> None:
    batcher = DynamicBatcher(Recorder(), executor=executor, max_batch_size=8)

    async def scenario() -> list[int | BaseException]:
        return await batcher.submit_many([1, -2, 3])

    first, second, third = asyncio.run(scenario())
    assert (first, third) == (10, 30)
    assert isinstance(second, ValueError) and str(second) == "bad -2"


def test_a_crashing_pass_fails_its_batch_and_the_batcher_goes_on(executor: ThreadPoolExecutor) -> None:
    calls = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return [i + 1 for i in items]

    batcher = DynamicBatcher(run, executor=executor)

    async def scenario() -> tuple[list[int | BaseException], int]:
        failed = await batcher.submit_many([1, 2])
        return failed, await batcher.submit(5)

    failed, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert after == 6


def test_a_cancelled_request_is_not_computed(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder(hold_first=True)
    batcher = DynamicBatcher(recorder, executor=executor)

    async def scenario() -> int:
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_started(recorder)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        recorder.release.set()
        await first
        return await kept

    assert asyncio.run(scenario()) == 30
    assert recorder.batches == [[1], [3]]


def test_a_free_slot_waits_at_most_max_wait_while_another_pass_runs(executor: ThreadPoolExecutor) -> None:
    """With two slots, a request that arrives during a pass may start the second slot, but only after
    waiting up to max_wait for batch-mates (here: it gathers those that arrive within the wait)."""
    recorder = Recorder(hold_first=True)
    batcher = DynamicBatcher(recorder, executor=executor, concurrency=2, max_wait_seconds=0.2)

    async def scenario() -> list[int]:
        first = asyncio.ensure_future(batcher.submit(1))
        await wait_started(recorder)
        second = asyncio.ensure_future(batcher.submit(2))
        third = asyncio.ensure_future(batcher.submit(3))
        got = await asyncio.wait_for(asyncio.gather(second, third), timeout=20)  # first still held
        recorder.release.set()
        return [await first, *got]

    assert asyncio.run(scenario()) == [10, 20, 30]
    assert recorder.batches[1] == [2, 3]


def test_a_new_event_loop_starts_with_a_clean_queue(executor: ThreadPoolExecutor) -> None:
    batcher = DynamicBatcher(Recorder(), executor=executor)
    assert asyncio.run(batcher.submit(1)) == 10
    assert asyncio.run(batcher.submit(2)) == 20


def test_invalid_limits_are_refused(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(Recorder(), executor=executor, max_batch_size=0)
