"""Conformance: queue runs (idle is new, --burst, stale sentinels) and delivery
counting (the tasks of a consumer that died come back alone, with their deaths
counted).  Runs against every backend."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import pytest
from helpers import drain, take_lease

from pcq.backends.base import Queue

if TYPE_CHECKING:
    from conftest import QueueFactory

fork = mp.get_context("fork")


def test_the_state_of_a_run(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    assert q.state() == "open"
    q.put("t")
    q.close()
    assert q.state() == "closing"  # closed with work left
    assert drain(q) == ["t"]
    assert q.state() == "idle"  # closed, every task acknowledged
    q.attach_producer()
    assert q.state() == "open"


def test_a_consumer_that_attaches_to_an_idle_queue_serves_the_next_run(
    make_queue: QueueFactory,
) -> None:
    # Given a finished run
    q = make_queue()
    q.put("first")
    q.close()
    first = make_queue.handle(q)
    first.attach_consumer()
    assert drain(first) == ["first"]
    assert q.state() == "idle"

    # When a consumer attaches, it waits: nothing to take, no sentinel
    late = make_queue.handle(q)
    late.join_run()
    assert late.take(1, timeout=0.3) is None

    # Then it takes part in the next run, to that run's sentinel
    q.attach_producer()
    q.put("second")
    q.detach_producer()
    assert drain(late) == ["second"]


def test_a_sentinel_of_a_finished_run_does_not_stop_a_consumer_of_the_next(
    make_queue: QueueFactory,
) -> None:
    # Given a run closed with a sentinel for a consumer that left without it
    q = make_queue()
    gone = make_queue.handle(q)
    gone.attach_consumer()
    q.close()
    gone.detach_consumer()
    assert q.state() == "idle"

    # When a consumer attaches to the idle queue
    late = make_queue.handle(q)
    late.join_run()

    # Then the leftover sentinel does not stop it; the next run's does
    assert late.take(1, timeout=0.3) is None
    q.attach_producer()
    q.put("next")
    q.detach_producer()
    assert drain(late) == ["next"]


def test_a_burst_consumer_drains_an_open_queue_without_producers_and_stops(
    make_queue: QueueFactory,
) -> None:
    q = make_queue()
    q.put_many(["a", "b"])  # put, no producer attached, not closed
    q.join_run(burst=True)
    assert drain(q) == ["a", "b"]


def test_a_replacement_stops_at_the_end_of_the_run_its_predecessor_served(
    make_queue: QueueFactory,
) -> None:
    q = make_queue()
    served = q.join_run()
    q.close()  # the run ends while the replacement is being started
    replacement = make_queue.handle(q)
    replacement.join_run(run=served)
    lease = take_lease(replacement)
    assert lease.sentinel is not None and lease.size == 0


def _take_three_and_hang(queue: Queue, report: Connection) -> None:
    """Child: take up to three tasks in one lease, report them, wait to be killed."""
    queue.attach_consumer()
    lease = take_lease(queue)
    report.send([env.body for env in lease.envelopes()])
    signal.pause()


def _dies_holding(queue: Queue) -> tuple[list[Any], int]:
    """A child consumer that took a lease and was SIGKILLed: (its bodies, pid)."""
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_take_three_and_hang, args=(queue, theirs), daemon=True)
    child.start()
    assert mine.poll(10), "the child consumer took nothing"
    bodies: list[Any] = mine.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.pid is not None
    return bodies, child.pid


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_tasks_of_a_consumer_that_died_come_back_alone_with_their_deaths(
    make_queue: QueueFactory,
) -> None:
    # Given a consumer that died holding a lease of three tasks
    q = make_queue()
    q.put_many(["a", "b", "c", "later"])
    q.note_task_cost(0.0)  # cheap tasks: big leases
    first, pid = _dies_holding(q)
    q.evict(pid)
    # and another that died holding one of them
    second, pid = _dies_holding(q)
    q.evict(pid)

    # When the queue hands them out again
    q.attach_consumer()
    deaths: dict[Any, int] = {}
    while len(deaths) < 4:
        lease = take_lease(q)
        bodies = [env.body for env in lease.envelopes()]
        if lease.deaths:  # a task that was in flight in a dead consumer: alone
            assert len(bodies) == 1
        for body in bodies:
            deaths[body] = lease.deaths
        q.ack(lease)

    # Then each counts the consumers that died while it was in flight
    assert len(second) == 1 and set(second) <= set(first)
    expected = {body: 1 for body in first} | {body: 2 for body in second}
    assert {b: d for b, d in deaths.items() if d} == expected
    assert q.counters().pending == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_consumer_killed_on_purpose_counts_no_death(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put("t")
    _, pid = _dies_holding(q)
    q.release(pid)  # its supervisor killed it (a task past its timeout)
    q.attach_consumer()
    lease = take_lease(q)
    assert [e.body for e in lease.envelopes()] == ["t"] and lease.deaths == 0
    q.ack(lease)
