"""Conformance: the protocol rules the review of issue #15 exposed.  Runs
against every backend.  Each test is a self-contained function (two helpers
add to this file: keep it that way)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from helpers import take_lease

from pcq.errors import ConfigError

if TYPE_CHECKING:
    from conftest import QueueFactory

    from pcq.backends.base import Queue


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
