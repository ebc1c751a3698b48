"""Conformance: protocol rules issue #15 found broken on one backend or the
other — what a dead-letter requeue counts, what purge leaves of a closed run.
Runs against every backend.  Each test stands alone (helpers inline), so that
tests of other rules can be added beside them without touching these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from helpers import take_lease

from pcq.backends.base import Failure

if TYPE_CHECKING:
    from conftest import QueueFactory


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
