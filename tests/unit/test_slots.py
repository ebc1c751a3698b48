"""The concurrent consume loop (pcq/slots.py) in one process: on the local
backend (one lease at a time) and on fakeredis (several leases at once)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from fake_redis import FakeRedis

from pcq.backends.base import Failure, Lease, Queue
from pcq.backends.local import LocalQueue
from pcq.backends.redis import RedisQueue
from pcq.envelope import Batch, Envelope
from pcq.errors import TaskTimeout
from pcq.runners import run_coroutine
from pcq.settings import StageSettings
from pcq.slots import Handling
from pcq.slots import consume as consume_loop


@pytest.fixture(params=["local", "redis"])
def queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    q: Queue
    if request.param == "local":
        q = LocalQueue("unit")
    else:
        q = RedisQueue("unit", client=FakeRedis(server=fakeredis.FakeServer()))
    q.attach_consumer()
    yield q
    q.detach_consumer()
    q.dispose()


class Tracker:
    """Counts handled items and the most calls running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.handled: Counter[Any] = Counter()

    def __enter__(self) -> None:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.running -= 1


def failure(retries: int) -> Callable[[Batch, int, BaseException], tuple[Failure, list[Any]]]:
    def make(batch: Batch, index: int, exc: BaseException) -> tuple[Failure, list[Any]]:
        env = batch.envelope(index)
        return Failure(env, repr(exc), retry_in=0.01 if env.attempts < retries else None), []

    return make


def consume(queue: Queue, handle: Callable[[Any], Any], *, is_async: bool = False,
            slots: int = 4, timeout: float | None = None, retries: int = 0) -> None:
    def settle(lease: Lease, failures: list[Failure], give_back: list[Envelope],
               outputs: list[Any], take: int) -> Lease | None:
        if take:
            return queue.ack_and_take(lease, failures, give_back, take, 0.25)
        queue.ack(lease, failures, give_back)
        return None

    handling = Handling(call=handle, is_async=is_async, failed=failure(retries), settle=settle,
                        count=lambda handled, failures: None, stopping=lambda: False)
    consume_loop(queue, handling, StageSettings(concurrency=slots, timeout=timeout,
                                                retries=retries))


def test_threads_run_tasks_at_once_and_every_task_is_done(queue: Queue) -> None:
    queue.put_many(range(20))
    queue.close()
    tracker = Tracker()

    def handle(item: int) -> None:
        with tracker:
            time.sleep(0.05)
        tracker.handled[item] += 1

    consume(queue, handle)
    assert tracker.handled == Counter(range(20))
    assert tracker.most >= 2
    counters = queue.counters()
    assert counters.done == 20 and counters.pending == 0 and counters.in_flight == 0


def test_async_tasks_run_at_once_on_one_loop(queue: Queue) -> None:
    queue.put_many(range(20))
    queue.close()
    tracker = Tracker()
    loops = set()

    async def handle(item: int) -> None:
        loops.add(id(asyncio.get_running_loop()))
        with tracker:
            await asyncio.sleep(0.05)
        tracker.handled[item] += 1

    consume(queue, handle, is_async=True)
    assert tracker.handled == Counter(range(20)) and tracker.most >= 2 and len(loops) == 1
    assert queue.counters().done == 20


def test_a_failing_task_is_retried_alone(queue: Queue) -> None:
    queue.put_many(range(12))
    queue.close()
    calls: Counter[int] = Counter()

    def handle(item: int) -> None:
        calls[item] += 1
        if item == 3 and calls[item] == 1:
            raise ValueError("once")

    consume(queue, handle, retries=1)
    assert calls == Counter({**dict.fromkeys(range(12), 1), 3: 2})
    counters = queue.counters()
    assert counters.done == 12 and counters.retried == 1 and counters.failed == 0


def test_a_thread_past_its_timeout_counts_failed_and_frees_its_slot(queue: Queue) -> None:
    queue.put_many(range(6))
    queue.close()
    release = threading.Event()

    def handle(item: int) -> None:
        if item == 0:
            release.wait(30)  # cannot be interrupted: runs on after its timeout

    try:
        consume(queue, handle, slots=2, timeout=0.2)
    finally:
        release.set()
    counters = queue.counters()
    assert counters.done == 5 and counters.failed == 1 and counters.pending == 0


def test_run_coroutine_cancels_at_the_timeout() -> None:
    cancelled = []

    async def stuck() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(TaskTimeout):
        asyncio.run(run_coroutine(stuck(), 0.05))
    assert cancelled == [True]


def test_run_coroutine_counts_a_loop_blocker_timed_out_and_keeps_other_errors() -> None:
    async def blocks() -> None:
        time.sleep(0.1)

    async def own_timeout() -> None:
        raise TimeoutError("the handler's own")

    with pytest.raises(TaskTimeout):
        asyncio.run(run_coroutine(blocks(), 0.05))
    with pytest.raises(TimeoutError, match="handler's own"):
        asyncio.run(run_coroutine(own_timeout(), 5))
    assert asyncio.run(run_coroutine(asyncio.sleep(0, "x"), 5)) == "x"


def test_an_async_handler_is_recognised_in_every_shape() -> None:
    import functools

    from pcq.roles import Consumer

    async def fetch(item: int, scale: int = 1) -> int:
        return item * scale

    class Fetcher:
        async def __call__(self, item: int) -> int:
            return item

    class Subclassed(Consumer):
        async def handle(self, item: Any) -> Any:
            return item

    q = LocalQueue("unit")
    try:
        for handler in (fetch, functools.partial(fetch, scale=2), Fetcher()):
            assert Consumer(q, handler)._is_async()
        assert Subclassed(q)._is_async()
        assert not Consumer(q, print)._is_async()
    finally:
        q.dispose()


def test_a_retry_of_a_task_still_running_when_the_sentinel_came_is_run(queue: Queue) -> None:
    # The queue hands this consumer its sentinel while only its own tasks are in
    # flight; one of those times out and is retried: the consumer stays for it.
    queue.put_many(range(8))
    queue.close()
    release = threading.Event()
    calls: Counter[int] = Counter()

    def handle(item: int) -> None:
        calls[item] += 1
        if item == 0 and calls[item] == 1:
            release.wait(30)  # past its timeout, while the others finish

    try:
        consume(queue, handle, slots=4, timeout=0.3, retries=1)
    finally:
        release.set()
    counters = queue.counters()
    assert calls[0] == 2
    assert counters.done == 8 and counters.retried == 1 and counters.pending == 0
