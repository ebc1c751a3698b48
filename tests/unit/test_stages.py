"""Stages in one process, on fakeredis: what a handler gives becomes outputs,
failures and retries put nothing, the output queue closes when the input is
finished; and the helpers that spread per-stage options."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import typer
from fake_redis import FakeRedis
from helpers import drain, take_bodies, wait_for

from pcq.backends.redis import RedisQueue
from pcq.cli_options import stage_values as _per_stage
from pcq.envelope import unpack_value
from pcq.errors import ConfigError
from pcq.pipeline import stage_queue
from pcq.settings import per_stage
from pcq.stages import ResultStage, Stage, close_if_finished, outputs_of


@pytest.fixture
def queues() -> Iterator[tuple[RedisQueue, RedisQueue]]:
    client = FakeRedis()
    q = RedisQueue("in", client=client, heartbeat_ttl=1.0)
    out = q.sibling("{in}.2")
    assert isinstance(out, RedisQueue)
    yield q, out
    out.dispose()
    q.dispose()


def run_stage(stage: Stage) -> None:
    """Run a stage's loop in this process until its sentinel."""
    stage.queue.attach_consumer()
    try:
        stage.consume()
    finally:
        stage.queue.detach_consumer()


def spread(x: int) -> Iterator[int]:
    if x % 2:
        yield x
        yield -x


def test_return_values_and_yields_are_outputs(queues: tuple[RedisQueue, RedisQueue]) -> None:
    q, out = queues
    q.put_many([1, 2, 3])
    q.close()
    run_stage(Stage(q, spread, to=out))
    out.attach_consumer()
    out.close()
    assert sorted(drain(out)) == [-3, -1, 1, 3]  # evens filtered out, odds fanned out

    q2, out2 = q.sibling("other"), q.sibling("{other}.2")
    q2.put_many(["a", "b"])
    q2.close()
    run_stage(Stage(q2, lambda item: None if item == "a" else item.upper(), to=out2))
    out2.attach_consumer()
    assert drain(out2) == [None, "B"]  # None is an output too, and out2 closed itself


def test_a_failing_task_puts_nothing_until_it_succeeds(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    q, out = queues
    calls: dict[int, int] = {}

    def flaky(x: int) -> Iterator[int]:
        calls[x] = calls.get(x, 0) + 1
        yield x * 10
        if x == 2 and calls[x] == 1:
            raise RuntimeError("half way through")  # its first output must not count
        yield x * 10 + 1

    q.put_many([1, 2])
    q.close()
    run_stage(Stage(q, flaky, to=out, retries=1, backoff=0.001))
    out.attach_consumer()
    assert sorted(drain(out)) == [10, 11, 20, 21]
    assert (q.counters().retried, q.counters().done) == (1, 2)


def test_an_output_that_cannot_travel_fails_its_task(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    q, out = queues
    q.put_many([1, 2])
    q.close()
    run_stage(Stage(q, lambda x: object() if x == 2 else x, to=out))
    c = q.counters()
    assert (c.done, c.failed, c.dead) == (1, 1, 1)
    assert "object" in q.dead_letters()[0]["error"]
    assert out.counters().produced == 1


def test_the_output_queue_closes_only_when_the_input_is_finished(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    q, out = queues
    q.put("x")
    assert not close_if_finished(q, out)  # open input
    q.close()
    assert not close_if_finished(q, out)  # closed, but a task is pending
    q.attach_consumer()
    drain(q)
    assert close_if_finished(q, out)
    assert out.counters().closed


def test_a_result_stage_reports_a_failure_as_an_output(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    # Given two chunks of pcq.map items, the second with an item that fails
    q, out = queues
    q.put_many([[0, [4, 2]], [2, [8, 0, 1]]])
    q.close()
    run_stage(ResultStage(q, lambda x: 8 // x, to=out, retries=1, backoff=0.001))
    out.attach_consumer()
    # Then every item has one result, the failed one its error (after the retry)
    got = sorted(unpack_value(packed) for lease in drain(out) for packed in lease)
    assert got[0] == [0, [2, 4], None]
    start, values, errors = got[1]
    assert (start, values) == (2, [1, None, 8])
    assert list(errors) == [1] and "ZeroDivisionError" in errors[1]
    assert (q.counters().retried, q.counters().failed) == (1, 1)


def test_a_result_stage_maps_every_item_after_failures_anywhere_in_a_chunk(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    # Given a chunk whose first, two middle ones in a row and last items fail
    q, out = queues
    q.put_many([[10, [0, 4, 0, 0, 2, 0]]])
    q.close()
    # When it runs out of retries
    run_stage(ResultStage(q, lambda x: 8 // x, to=out))
    out.attach_consumer()
    # Then each item has its result or its own error, in its place
    [(start, values, errors)] = [unpack_value(packed) for lease in drain(out) for packed in lease]
    assert (start, values) == (10, [None, 2, None, None, 4, None])
    assert sorted(errors) == [0, 2, 3, 5]
    assert all("ZeroDivisionError" in e for e in errors.values())


def test_outputs_of() -> None:
    assert outputs_of(None) == [None]
    assert outputs_of([1, 2]) == [[1, 2]]
    assert outputs_of(x for x in (1, 2)) == [1, 2]


def test_stage_queue_names_share_a_hash_tag() -> None:
    assert [stage_queue("crawl", k) for k in range(3)] == ["crawl", "{crawl}.2", "{crawl}.3"]
    assert stage_queue("{crawl}.fetch", 1) == "{crawl}.fetch.2"


def test_per_stage_values() -> None:
    assert per_stage(4, 3, "workers") == [4, 4, 4]
    assert per_stage([1, 2, 3], 3, "workers") == [1, 2, 3]
    with pytest.raises(ConfigError, match="one per stage"):
        per_stage([1, 2], 3, "workers")
    assert _per_stage("8,4,1", 3, "--workers", int) == [8, 4, 1]
    assert _per_stage("2", 3, "--workers", int) == [2, 2, 2]
    assert _per_stage("none,1.5", 2, "--timeout", float) == [None, 1.5]
    with pytest.raises(typer.BadParameter, match="one per stage"):  # a usage error
        _per_stage("1,2", 3, "--retries", int)


def test_stage_queues_must_be_on_one_server() -> None:
    a = RedisQueue("a", client=FakeRedis())
    b = RedisQueue("b", client=FakeRedis(server=None))
    try:
        with pytest.raises(ConfigError, match="one Redis server"):
            a._target(b)
    finally:
        a.dispose()
        b.dispose()




def test_a_full_next_queue_holds_the_stage_back(queues: tuple[RedisQueue, RedisQueue]) -> None:
    q, _ = queues
    out = q.sibling("{in}.full", maxsize=2)
    # Given a next queue already full (filled past its maxsize through a handle without one)
    filler = q.sibling("{in}.full")
    filler.put_many(["old", "old", "old"])
    filler.dispose()
    q.put("new")
    q.close()
    stage = Stage(q, lambda x: x, to=out)
    runner = threading.Thread(target=run_stage, args=(stage,))
    runner.start()
    try:
        # Then the stage handles its task but holds its output back
        wait_for(lambda: q.counters().in_flight == 1, message="the stage to take its task")
        assert out.counters().produced == 3
        # Until the next stage makes room
        out.attach_consumer()
        take_bodies(out, 2)
        wait_for(lambda: out.counters().produced == 4, message="the held output")
    finally:
        runner.join(10)
        out.dispose()
    assert q.counters().done == 1


def test_an_async_handler_stage_awaits_and_puts_what_it_returns(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    q, out = queues

    async def shout(word: str) -> str:
        return word.upper()

    q.put_many(["a", "b"])
    q.close()
    run_stage(Stage(q, shout, to=out))
    out.attach_consumer()
    assert sorted(drain(out)) == ["A", "B"]


def test_pcq_map_stage_refuses_concurrency(queues: tuple[RedisQueue, RedisQueue]) -> None:
    q, out = queues
    with pytest.raises(ConfigError, match="one task at a time"):
        ResultStage(q, abs, to=out, concurrency=4)


def test_concurrent_stage_outputs_ride_on_their_tasks_acks(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    # Given a generator stage with 8 slots; one task fails half way, once
    q, out = queues
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int) -> Iterator[int]:
        with lock:
            calls[x] = calls.get(x, 0) + 1
            first = calls[x] == 1
        yield x * 10
        if x == 7 and first:
            raise RuntimeError("half way through")  # its first output must not count
        if x % 3:
            yield x * 10 + 1

    q.put_many(list(range(40)))
    q.close()
    run_stage(Stage(q, flaky, to=out, retries=1, backoff=0.001, concurrency=8))
    out.attach_consumer()
    # Then each task's outputs are on the next queue exactly once, and it closed
    assert sorted(drain(out)) == sorted(
        [x * 10 for x in range(40)] + [x * 10 + 1 for x in range(40) if x % 3])
    assert calls[7] == 2


def test_a_timed_out_concurrent_task_gives_no_outputs(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    # Given a thread stage whose task 3 outlives its timeout on its first attempt
    q, out = queues
    release = threading.Event()
    tries: dict[int, int] = {}

    def slow_once(x: int) -> int:
        tries[x] = tries.get(x, 0) + 1
        if x == 3 and tries[x] == 1:
            release.wait(10)  # returns after its timeout: that result must be ignored
        return x

    q.put_many(list(range(10)))
    q.close()
    try:
        run_stage(Stage(q, slow_once, to=out, retries=1, backoff=0.001, timeout=0.3,
                        concurrency=4))
    finally:
        release.set()
    out.attach_consumer()
    assert sorted(drain(out)) == list(range(10))


def test_concurrent_async_stage(queues: tuple[RedisQueue, RedisQueue]) -> None:
    q, out = queues

    async def shout(word: str) -> str:
        return word.upper()

    q.put_many(list("abcdef"))
    q.close()
    run_stage(Stage(q, shout, to=out, concurrency=4))
    out.attach_consumer()
    assert sorted(drain(out)) == list("ABCDEF")


def test_with_a_timeout_outputs_are_kept_after_the_task(
    queues: tuple[RedisQueue, RedisQueue],
) -> None:
    # (the outputs are kept once the task's timer has stopped, not inside it)
    q, out = queues
    q.put_many([1, 2, 3])
    q.close()
    run_stage(Stage(q, spread, to=out, timeout=30.0))
    out.attach_consumer()
    assert sorted(drain(out)) == [-3, -1, 1, 3]
