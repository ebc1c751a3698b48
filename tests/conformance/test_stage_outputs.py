"""Conformance: a stage's outputs and the acknowledgement of its lease are one
atomic step (``ack(..., outputs=, to=)``) — on every backend.  A stale lease
commits nothing: no outputs, no counters."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from helpers import take_bodies, take_lease

from pcq.backends.base import Failure, Lease, Outcome, Queue
from pcq.errors import ConfigError

if TYPE_CHECKING:
    from conftest import QueueFactory


def test_outputs_land_on_the_target_with_the_ack(make_queue: QueueFactory) -> None:
    # Given a stage's input queue holding three tasks, and its output queue
    q = make_queue()
    out = make_queue.sibling(q)
    q.attach_consumer()
    out.attach_consumer()
    q.put_many(["a", "b", "c"])
    lease = take_bodies_lease(q, 3)

    # When the lease is acknowledged with four outputs, None among them
    q.ack(lease, outputs=["A", None, ["b", 1], "C"], to=out)

    # Then the input is done and the outputs are pending tasks of the target
    c, o = q.counters(), out.counters()
    assert (c.done, c.pending, c.in_flight) == (3, 0, 0)
    assert (o.produced, o.pending, o.done) == (4, 4, 0)
    assert take_bodies(out, 4) == ["A", None, ["b", 1], "C"]
    assert out.counters().done == 4


def test_failures_and_give_backs_go_with_the_outputs_of_the_others(
    make_queue: QueueFactory,
) -> None:
    q = make_queue()
    out = make_queue.sibling(q)
    q.attach_consumer()
    q.put_many([1, 2, 3])
    lease = take_bodies_lease(q, 3)
    _first, second, third = list(lease.envelopes())
    # One task failed for good, one was never started: only the first produced
    q.ack(lease, [Failure(second, "ValueError: no")], [third], outputs=[10, 11], to=out)
    c, o = q.counters(), out.counters()
    assert (c.done, c.failed, c.dead, c.pending, c.ready) == (1, 1, 1, 1, 1)
    assert (o.produced, o.pending) == (2, 2)


def test_ack_and_take_carries_outputs_too(make_queue: QueueFactory) -> None:
    q = make_queue()
    out = make_queue.sibling(q)
    q.attach_consumer()
    q.put(1)
    first = take_lease(q)
    q.put(2)
    second = q.ack_and_take(first, max_tasks=1, timeout=5.0, outputs=["one"], to=out)
    assert second is not None
    q.ack(second, outputs=["two", "two again"], to=out)
    assert (q.counters().done, out.counters().produced) == (2, 3)
    out.attach_consumer()
    assert take_bodies(out, 3) == ["one", "two", "two again"]


def test_a_stale_lease_commits_neither_outputs_nor_counters(make_queue: QueueFactory) -> None:
    # Given consumer A holding a task, then losing it (detached: reaped)
    a = make_queue()
    out = make_queue.sibling(a)
    a.attach_consumer()
    a.put("task")
    stale = take_lease(a)
    a.detach_consumer()
    # ... and consumer B holding it now
    b = make_queue.handle(a)
    b.attach_consumer()
    fresh = take_lease(b)

    # When A acknowledges it late, with outputs
    a.ack(stale, outputs=["from A"], to=out)

    # Then nothing reached the target and no counter moved
    o = out.counters()
    assert (o.produced, o.pending, o.ready) == (0, 0, 0)
    assert (b.counters().done, b.counters().pending) == (0, 1)

    # And B's acknowledgement commits its outputs once
    b.ack(fresh, outputs=["from B"], to=out)
    o = out.counters()
    assert (o.produced, o.pending) == (1, 1)
    out.attach_consumer()
    assert take_bodies(out, 1) == ["from B"]


def test_outputs_to_a_closed_target_reopen_it(make_queue: QueueFactory) -> None:
    # A target closed by an earlier run is a new run for these outputs, as a
    # put to a closed queue is: its consumers do not stop at the old sentinels.
    q = make_queue()
    out = make_queue.sibling(q)
    out.close()
    assert out.counters().closed
    q.attach_consumer()
    q.put("x")
    q.ack(take_lease(q), outputs=["y"], to=out)
    assert not out.counters().closed
    out.attach_consumer()
    assert take_bodies(out, 1) == ["y"]


def test_outputs_need_a_target(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("x")
    lease = take_lease(q)
    with pytest.raises(ValueError, match="to="):
        q.ack(lease, outputs=["y"])


def test_a_backend_without_the_atomic_step_says_so(make_queue: QueueFactory) -> None:
    q = make_queue()
    with pytest.raises(ConfigError, match="cannot put a stage's outputs"):
        Queue._ack_out(q, Lease([]), Outcome(0, 0, [], [], []), q)


def take_bodies_lease(q: Queue, count: int) -> Lease:
    """One lease of at least ``count`` tasks (they were put together)."""
    lease = q.take(count, timeout=5.0)
    assert lease is not None and lease.size >= count, "the tasks did not come in one lease"
    return lease
