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

from pcq.backends.base import Queue, poisoned

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


def _take_and_hang(queue: Queue, report: Connection, poison: Any) -> None:
    """Child: take leases (acknowledging those without ``poison``) until one holds
    ``poison`` (or any task, if None); report that lease's bodies, wait to be killed."""
    queue.attach_consumer()
    while True:
        lease = queue.take(3, timeout=5)
        if lease is None or not lease.batches:
            continue
        bodies = [env.body for env in lease.envelopes()]
        if poison is None or poison in bodies:
            report.send(bodies)
            signal.pause()
        queue.ack(lease)


def _dies_holding(queue: Queue, poison: Any = None) -> tuple[list[Any], int]:
    """A child consumer SIGKILLed while it held a lease (one with ``poison``):
    (the lease's bodies, the child's pid)."""
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_take_and_hang, args=(queue, theirs, poison), daemon=True)
    child.start()
    assert mine.poll(20), "the child consumer took nothing"
    bodies: list[Any] = mine.recv()
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.pid is not None
    return bodies, child.pid


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_tasks_of_a_consumer_that_died_come_back_one_a_lease(make_queue: QueueFactory) -> None:
    # Given a consumer that died holding a lease of several tasks
    q = make_queue()
    q.note_task_cost(0.0)  # cheap tasks: big leases
    q.put_many(["a", "b", "c"])
    held, pid = _dies_holding(q)
    assert len(held) > 1
    q.evict(pid)

    # When the queue hands them out again
    q.attach_consumer()
    leases = []
    while sum(map(len, leases)) < 3:
        lease = take_lease(q)
        leases.append([env.body for env in lease.envelopes()])
        q.ack(lease)

    # Then each of the dead consumer's tasks comes alone: a poison task among
    # them could take none of the others down with it again
    assert all(len(bodies) == 1 for bodies in leases if set(bodies) & set(held))
    assert sorted(b for bodies in leases for b in bodies) == ["a", "b", "c"]
    assert q.counters().pending == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_a_task_whose_consumers_died_max_deliveries_times_is_dead_lettered(
    make_queue: QueueFactory,
) -> None:
    # Given a poison task among innocent ones, and consumers it killed
    q = make_queue()
    q.note_task_cost(0.0)
    q.put_many(["a", "poison", "b", "c"])
    for _ in range(q.max_deliveries):
        held, pid = _dies_holding(q, "poison")
        assert "poison" in held
        q.evict(pid)

    # When a consumer takes what is left, as Consumer does (a lease with
    # max_deliveries deaths is acknowledged as failed, unrun)
    q.attach_consumer()
    handled: list[Any] = []
    while q.counters().pending:
        lease = q.take(1, timeout=1)
        if lease is None:
            continue
        failures = poisoned(lease, q.max_deliveries)
        handled += [env.body for env in lease.envelopes()] if not failures else []
        q.ack(lease, failures)

    # Then every innocent task is done (by the children or this consumer), the
    # poison one dead-lettered with the reason and counted failed
    assert "poison" not in handled
    (letter,) = q.dead_letters()
    assert letter["body"] == "poison"
    assert letter["error"] == f"consumer died {q.max_deliveries} times while handling it"
    c = q.counters()
    assert (c.done, c.failed, c.dead, c.pending) == (3, 1, 1, 0)
