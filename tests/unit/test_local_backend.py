"""What only the local backend does: batch sizing, in-flight files and the
rules ``reap`` follows, sentinel messages on the pipe, its temp dir."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from helpers import take_bodies, take_lease, wait_for

from pcq.backends import open_queue
from pcq.backends.base import MAX_BATCH, Failure, Queue
from pcq.backends.local import LocalQueue
from pcq.envelope import SENTINEL_PREFIX

fork = mp.get_context("fork")


@pytest.fixture
def make_local() -> Iterator[Callable[..., LocalQueue]]:
    made: list[LocalQueue] = []

    def make(maxsize: int = 0) -> LocalQueue:
        q = LocalQueue("unit", maxsize=maxsize)
        made.append(q)
        return q

    yield make
    for q in made:
        q.dispose()


def _messages_on_pipe(q: LocalQueue, expected: int) -> list[bytes]:
    """Read the raw messages off the queue's pipe (waiting for ``expected``)."""
    out: list[bytes] = []
    deadline = time.monotonic() + 5
    while (item := q._recv(max(0.0, deadline - time.monotonic()) if len(out) < expected else 0.1)):
        out.append(item[0])
    return out


# ---------------------------------------------------------------- batch sizing


def test_open_queue_local_is_a_local_queue() -> None:
    q = open_queue("local", maxsize=16)
    try:
        assert isinstance(q, LocalQueue) and q.maxsize == 16
    finally:
        q.dispose()


def test_batches_are_single_tasks_until_a_consumer_reports_a_cost(make_local: Any) -> None:
    q = make_local()
    assert q.batch_limit() == 1


@pytest.mark.parametrize(
    ("maxsize", "cost", "limit"),
    [
        (0, 1e-7, MAX_BATCH),  # cheap tasks, unbounded queue: the largest batch
        (0, 1e-4, 50),  # 5 ms of work per batch
        (16, 1e-7, 4),  # never more than a quarter of maxsize
        (1000, 1e-7, 250),
        (3, 1e-7, 1),
        (0, 0.5, 1),  # slow handler: one task per batch, so tasks spread out
    ],
)
def test_batch_limit_follows_the_reported_cost(
    make_local: Any, maxsize: int, cost: float, limit: int
) -> None:
    q = make_local(maxsize)
    q.note_task_cost(cost)
    assert q.batch_limit() == limit


def test_reported_costs_are_smoothed(make_local: Any) -> None:
    q = make_local()
    q.note_task_cost(1e-4)  # alone: batches of 50
    q.note_task_cost(1e-3)  # alone: batches of 5; moves the estimate a quarter of the way
    assert q.batch_limit() == 15


def test_put_many_ships_batches_and_in_flight_counts_tasks(make_local: Any) -> None:
    # Given cheap tasks on a queue of maxsize 16
    q = make_local(16)
    q.note_task_cost(1e-7)
    q.attach_consumer()

    # When 10 tasks are put at once
    q.put_many(range(10))

    # Then they travel in batches of at most maxsize / 4, in order
    sizes, bodies = [], []
    while len(bodies) < 10:
        lease = take_lease(q)
        sizes.append(lease.size)
        assert q.counters().in_flight == lease.size
        bodies += [e.body for e in lease.envelopes()]
        q.ack(lease)
    assert sizes == [4, 4, 2]
    assert bodies == list(range(10))


def test_a_trickle_is_sent_as_it_comes(make_local: Any) -> None:
    q = make_local()
    q.note_task_cost(1e-7)  # batches could be large
    q.attach_consumer()

    def slowly() -> Iterator[int]:
        for n in range(3):
            time.sleep(0.01)  # a producer much slower than LINGER_SECONDS
            yield n

    q.put_many(slowly())

    assert [take_lease(q).size for _ in range(3)] == [1, 1, 1]


def test_backpressure_counts_batch_slots(make_local: Any) -> None:
    q = make_local(8)  # batches of 2: four slots
    q.note_task_cost(1e-7)
    for _ in range(4):
        q.put_many([1, 2])

    assert not q._space.acquire(timeout=0.05)  # the queue is full


# ---------------------------------------------------------------- sentinels on the pipe


def test_close_places_one_sentinel_message_per_live_consumer(make_local: Any) -> None:
    q = make_local()
    other = copy.copy(q)
    q.attach_consumer()
    other.attach_consumer()
    q.put("task")

    q.close()
    q.close()  # idempotent: no more sentinels

    messages = _messages_on_pipe(q, 3)
    assert len(messages) == 3
    assert not messages[0].startswith(SENTINEL_PREFIX)
    assert [m.startswith(SENTINEL_PREFIX) for m in messages[1:]] == [True, True]
    other.detach_consumer()


def test_close_reaps_first_so_a_dead_consumer_gets_no_sentinel(make_local: Any) -> None:
    q = make_local()
    child = fork.Process(target=_attach_and_pause, args=(q,), daemon=True)
    child.start()
    wait_for(lambda: q.counters().consumers == 1, message="the child attached")
    q.attach_consumer()
    _kill(child)
    assert q.counters().consumers == 2  # not yet noticed

    q.close()

    assert q.counters().consumers == 1
    assert len(_messages_on_pipe(q, 1)) == 1


def test_a_stale_sentinel_is_dropped_as_an_empty_lease(make_local: Any) -> None:
    q = make_local()
    q.attach_consumer()
    q.close()
    q.attach_producer()  # a new epoch: the sentinel on the pipe is stale

    lease = q.take(1, timeout=5)

    assert lease is not None
    assert (lease.size, lease.sentinel, lease.bad) == (0, None, [])
    q.ack(lease)
    assert q.counters().pending == 0


# ---------------------------------------------------------------- in-flight files and reap


def _attach_and_pause(q: Queue) -> None:
    q.attach_consumer()
    signal.pause()


def _kill(child: Any) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL


def _script(q: LocalQueue, steps: list[str], report: Connection) -> None:
    """Child: attach, run ``steps`` against the queue, report, wait to be killed.

    take  take a lease          done  ack it            retry  ack it, retry in 1 h
    put   put a new task "new"
    """
    q.attach_consumer()
    lease = None
    for step in steps:
        if step == "take":
            lease = take_lease(q)
        elif step == "done":
            assert lease is not None
            q.ack(lease)
        elif step == "retry":
            assert lease is not None
            q.ack(lease, [Failure(e, "E", "tb", retry_in=3600) for e in lease.envelopes()])
        elif step == "put":
            q.put("new")
            # A local put is written by a feeder thread: let it reach the pipe
            # before this process is killed.
            q._q.close()
            q._q.join_thread()
    report.send("ready")
    signal.pause()


def _run_and_kill(q: LocalQueue, steps: list[str]) -> int:
    """Run ``steps`` in a child consumer, SIGKILL it; its pid."""
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_script, args=(q, steps, theirs), daemon=True)
    child.start()
    assert mine.poll(10) and mine.recv() == "ready"
    _kill(child)
    assert child.pid is not None
    return child.pid


@pytest.mark.parametrize(
    ("steps", "back", "expected"),
    [
        # the lease was not acknowledged: it goes back as it was
        (["take"], 1, [("a", 0), ("b", 0)]),
        # acknowledged: nothing goes back
        (["take", "done"], 0, [("b", 0)]),
        # acknowledged with a retry: the retry goes back, one attempt counted
        (["take", "retry"], 1, [("a", 1), ("b", 0)]),
        # a retry held, a second lease not acknowledged: both go back
        (["take", "retry", "take"], 2, [("a", 1), ("b", 0)]),
        # a consumer that also put a task after its ack: the ack still stands
        (["take", "done", "put"], 0, [("b", 0), ("new", 0)]),
    ],
    ids=["unacked", "acked", "retry-held", "retry-and-unacked", "acked-then-put"],
)
def test_reap_puts_back_what_the_in_flight_file_says(
    make_local: Any, steps: list[str], back: int, expected: list[tuple[str, int]]
) -> None:
    # Given tasks "a" then "b", and a consumer killed after ``steps``
    q = make_local()
    q.put("a")
    q.put("b")
    _run_and_kill(q, steps)
    q.attach_consumer()

    # When it is reaped
    assert q.reap() == back
    assert q.reap() == 0  # a reaped consumer is reaped once

    # Then exactly the tasks it had not finished are delivered again
    assert q.counters().pending == len(expected)
    got: list[tuple[str, int]] = []
    while len(got) < len(expected):
        lease = take_lease(q)
        got += [(e.body, e.attempts) for e in lease.envelopes()]
        q.ack(lease)
    assert sorted(got) == expected
    assert q.take(1, timeout=0.1) is None
    c = q.counters()
    assert (c.pending, c.done) == (0, c.produced)


def test_a_live_or_detached_consumer_is_not_reaped(make_local: Any) -> None:
    q = make_local()
    q.put("a")
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_script, args=(q, ["take"], theirs), daemon=True)
    child.start()
    assert mine.poll(10)
    q.attach_consumer()

    assert q.reap() == 0  # it holds its flock: alive
    q.detach_consumer()
    assert q.reap() == 0
    _kill(child)
    assert q.reap() == 1


def test_reap_does_not_block_on_a_full_queue(make_local: Any) -> None:
    q = make_local(2)
    q.put("held")
    _run_and_kill(q, ["take"])
    q.put("x")
    q.put("y")  # full again

    assert q.reap() == 1  # returned without a space permit

    q.attach_consumer()
    assert sorted(take_bodies(q, 3)) == ["held", "x", "y"]


def test_evict_reaps_only_the_given_pid(make_local: Any) -> None:
    q = make_local()
    q.put("a")
    q.put("b")
    first = _run_and_kill(q, ["take"])
    _run_and_kill(q, ["take"])

    assert q.evict(first) == 1
    assert q.evict(first) == 0
    assert q.reap() == 1


def test_detach_hands_back_the_unacknowledged_lease_and_retries(make_local: Any) -> None:
    q = make_local()
    q.put("a")
    q.put("b")
    q.attach_consumer()
    lease = take_lease(q)
    q.ack(lease, [Failure(e, "E", "tb", retry_in=3600) for e in lease.envelopes()])
    take_lease(q)  # holds "b"

    q.detach_consumer()

    other = LocalQueue.__new__(LocalQueue)
    other.__setstate__(q.__getstate__())  # a fresh handle in this process
    other.attach_consumer()
    got = []
    for _ in range(2):
        lease = take_lease(other)
        got += [(e.body, e.attempts) for e in lease.envelopes()]
        other.ack(lease)
    other.detach_consumer()
    assert sorted(got) == [("a", 1), ("b", 0)]
    assert q.counters().pending == 0


# ---------------------------------------------------------------- files


def test_each_consumer_has_an_in_flight_file_in_the_queue_dir(make_local: Any) -> None:
    q = make_local()
    q.attach_consumer()
    assert os.listdir(q._dir) == [f"c{q._slot}"]


def test_dispose_in_the_opening_process_removes_the_temp_dir() -> None:
    q = LocalQueue("unit")
    q.attach_consumer()
    q.put(1)
    lease = take_lease(q)
    q.ack(lease, [Failure(e, "E", "tb") for e in lease.envelopes()])
    assert q.counters().dead == 1
    directory = q._dir

    q.dispose()

    assert not os.path.exists(directory)


def _dispose_in_child(q: LocalQueue) -> None:
    q.attach_consumer()
    q.dispose()


def test_dispose_in_a_child_process_keeps_the_queue(make_local: Any) -> None:
    q = make_local()
    child = fork.Process(target=_dispose_in_child, args=(q,))
    child.start()
    child.join(10)

    assert child.exitcode == 0
    assert os.path.isdir(q._dir)
    q.put("still works")
    q.attach_consumer()
    assert take_bodies(q, 1) == ["still works"]
