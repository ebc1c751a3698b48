"""Conformance: the protocol rules the review of issue #15 exposed.  Runs
against every backend.  Each test is a self-contained function (two helpers
add to this file: keep it that way)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from helpers import take_lease

if TYPE_CHECKING:
    from conftest import QueueFactory


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
