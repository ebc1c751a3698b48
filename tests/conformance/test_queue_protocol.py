"""Conformance: the protocol rules the review of issue #15 exposed — what a
dead-letter requeue counts, what purge leaves of a closed run, which keys a
queue name maps to, how producers are detached.  Runs against every backend.
Each test is a self-contained function."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from helpers import take_lease
from test_queue_runs import _dies_holding

from pcq.backends.base import Failure
from pcq.errors import ConfigError

if TYPE_CHECKING:
    from conftest import QueueFactory

    from pcq.backends.base import Queue


def test_a_requeued_dead_task_is_pending_again_not_produced_again(
    make_queue: QueueFactory,
) -> None:
    # Given a one-task run whose task was dead-lettered
    q = make_queue()
    q.attach_consumer()
    q.put("x")
    lease = take_lease(q)
    q.ack(lease, [Failure(env, "E", "tb") for env in lease.envelopes()])
    c = q.counters()
    assert (c.produced, c.failed, c.dead, c.pending) == (1, 1, 1, 0)
    # When it is requeued
    assert q.requeue_dead() == 1
    # Then it counts as produced once, failed no more, pending again
    c = q.counters()
    assert (c.produced, c.failed, c.dead, c.pending, c.ready) == (1, 0, 0, 1, 1)
    # ... and handling it finishes the run: done 1 of 1
    lease = take_lease(q)
    assert [env.body for env in lease.envelopes()] == ["x"]
    q.ack(lease)
    c = q.counters()
    assert (c.produced, c.done, c.failed, c.pending) == (1, 1, 0, 0)
    assert q.join(timeout=5)


def test_purge_keeps_closed(make_queue: QueueFactory) -> None:
    # Given a closed run with tasks still ready and a consumer attached
    q = make_queue()
    q.attach_consumer()
    q.put_many(["a", "b", "c"])
    q.close()
    assert q.state() == "closing"
    # When the tasks are purged
    q.purge()
    # Then the run is still closed (purge never reopens it) ...
    c = q.counters()
    assert (c.closed, c.ready, c.pending) == (True, 0, 0), c
    assert q.state() == "idle"
    # ... so the consumer that was serving it gets its stop
    lease = take_lease(q)
    assert lease.sentinel is not None and not lease.batches
    q.ack(lease)


def test_purge_keeps_a_closed_run_closed_and_its_consumers_stop(
    make_queue: QueueFactory,
) -> None:
    # Given a consumer holding one task of a closed run, more tasks behind it
    q = make_queue()
    q.attach_consumer()
    q.put_many(range(4))
    held = take_lease(q)
    q.close()

    # When the queue is purged
    q.purge()

    # Then it is still closed with nothing ready, and once the consumer has
    # acknowledged what it held (applied or stale), the run is over and its next
    # take is its sentinel: it stops instead of waiting for a run that never comes
    c = q.counters()
    assert c.closed and c.ready == 0
    q.ack(held)
    assert q.counters().pending == 0 and q.state() == "idle"
    lease = take_lease(q)
    assert lease.sentinel is not None and lease.size == 0
    q.ack(lease)


def test_a_queue_name_maps_to_keys_of_its_own(make_queue: QueueFactory) -> None:
    # Given queue N with two tasks
    q = make_queue()
    q.put_many([1, 2])

    # When queues named "{N}" and "{N}.2" (a pipeline's second stage) are opened
    # on the same server: a backend may refuse the first, as Redis does, since it
    # would name N's own keys
    others: list[Queue] = []
    for name in (f"{{{q.name}}}", f"{{{q.name}}}.2"):
        try:
            others.append(q.sibling(name))
        except ConfigError:
            assert name == f"{{{q.name}}}"
    try:
        # Then none of them shares anything with N
        for other in others:
            assert other.counters().produced == 0
            other.put(3)
        c = q.counters()
        assert (c.produced, c.ready) == (2, 2)
    finally:
        for other in others:
            other.purge()
            other.dispose()


def test_a_producer_is_detached_by_its_id_and_the_last_one_out_closes(
    make_queue: QueueFactory,
) -> None:
    # Given two producers: this process's own, and one attached by another
    # handle under an id of its own (a producer process that is then killed)
    q = make_queue()
    child = make_queue.handle(q)
    mine = q.attach_producer()
    theirs = child.attach_producer("producer-child")
    assert theirs == "producer-child" and mine != theirs

    # When this process detaches the other producer by its id, then its own
    q.detach_producer("producer-child", close_if_last=True)
    assert not q.counters().closed  # ours is still attached
    q.detach_producer(close_if_last=True)

    # Then the queue is closed, with no producer left
    c = q.counters()
    assert c.closed and c.producers == 0


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_consumer_holding_a_suspect_is_never_handed_another(make_queue: QueueFactory) -> None:
    # Given the tasks of a consumer that died holding several (suspects now)
    q = make_queue()
    q.note_task_cost(0.0)  # cheap tasks: big leases
    q.put_many(["a", "b", "c"])
    held, pid = _dies_holding(q)
    assert len(held) > 1
    q.evict(pid)
    q.attach_consumer()

    # When a consumer takes one, and asks for more while it still holds it
    first = take_lease(q)
    more = q.take(10, timeout=0.5)

    # Then the first is one of the dead consumer's tasks, alone, and no second
    # one joins it in the same consumer (two suspects in one process could die
    # together, each counting a death it may not deserve)
    assert first.size == 1 and next(first.envelopes()).body in held
    assert more is None or not {e.body for e in more.envelopes()} & set(held)
    # ... and once it is settled, the next one comes, again alone
    q.ack(first)
    if more is not None:
        q.ack(more)
    nxt = take_lease(q)
    assert nxt.size == 1 and next(nxt.envelopes()).body in held
    q.ack(nxt)
