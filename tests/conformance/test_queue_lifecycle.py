"""Conformance: closing (one sentinel per consumer, epochs, late consumers),
join and backpressure.  Runs against every backend."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from helpers import drain, take_bodies, take_lease, wait_for

from pcq.backends.base import Failure

if TYPE_CHECKING:
    from conftest import QueueFactory


def test_close_puts_a_sentinel_behind_all_tasks(make_queue: QueueFactory) -> None:
    # Given two consumers and three tasks
    a = make_queue()
    b = make_queue.handle(a)
    a.attach_consumer()
    b.attach_consumer()
    for n in range(3):
        a.put(n)

    # When the queue is closed
    a.close()
    assert a.counters().closed

    # Then the first consumer gets every task before its sentinel, and the
    # second only a sentinel: sentinels are behind all tasks
    assert drain(a) == [0, 1, 2]
    lease = take_lease(b)
    assert lease.sentinel is not None and lease.size == 0
    b.ack(lease)
    c = a.counters()
    assert (c.produced, c.done, c.pending) == (3, 3, 0)


def test_every_attached_consumer_gets_its_own_sentinel(make_queue: QueueFactory) -> None:
    q = make_queue()
    consumers = [q, make_queue.handle(q), make_queue.handle(q)]
    for c in consumers:
        c.attach_consumer()
    assert q.counters().consumers == 3

    q.close()

    for c in consumers:
        lease = take_lease(c, timeout=2)
        assert lease.sentinel is not None
        assert lease.size == 0
        c.ack(lease)


def test_take_returns_no_task_after_a_sentinel(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put_many(range(5))
    q.close()

    lease = q.take(100, timeout=2)
    while lease is not None and lease.sentinel is None:
        q.ack(lease)
        lease = q.take(100, timeout=2)

    assert lease is not None
    q.ack(lease)
    assert q.counters().pending == 0  # every task came before the sentinel


def test_close_is_idempotent(make_queue: QueueFactory) -> None:
    a = make_queue()
    b = make_queue.handle(a)
    a.attach_consumer()
    b.attach_consumer()
    a.put("t")

    a.close()
    a.close()
    b.close()

    c = a.counters()
    assert c.closed and c.pending == 1
    assert drain(a) == ["t"]
    assert drain(b) == []
    # A second round after reopening sees no sentinel left over as current.
    a.attach_producer()
    a.put("u")
    lease = take_lease(a)
    assert lease.sentinel is None
    assert [e.body for e in lease.envelopes()] == ["u"]
    a.ack(lease)


def test_a_sentinel_of_an_earlier_epoch_is_not_obeyed(make_queue: QueueFactory) -> None:
    # Given a consumer whose sentinel is in the queue
    q = make_queue()
    q.attach_consumer()
    q.close()

    # When a producer reopens the queue (a new run) and puts a task
    q.attach_producer()
    assert not q.counters().closed
    q.put("new run")

    # Then the old sentinel is dropped: the consumer gets the task, not a stop
    lease = take_lease(q)
    assert lease.sentinel is None
    assert [e.body for e in lease.envelopes()] == ["new run"]
    q.ack(lease)

    # And the sentinel of this run's close is obeyed
    q.detach_producer()
    assert q.counters().closed
    assert drain(q) == []


def test_the_last_producer_to_detach_closes(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.attach_producer()
    q.attach_producer()
    q.put(1)

    q.detach_producer()
    assert not q.counters().closed
    q.detach_producer()

    assert q.counters().closed
    assert drain(q) == [1]


def test_detach_producer_without_closing(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_producer()

    q.detach_producer(close_if_last=False)

    c = q.counters()
    assert (c.producers, c.closed) == (0, False)


def test_a_consumer_that_starts_after_close_drains_then_stops(make_queue: QueueFactory) -> None:
    # Given tasks on a queue closed while no consumer was attached
    q = make_queue()
    q.put_many(["a", "b", "c"])
    q.close()

    # When a consumer starts
    q.attach_consumer()

    # Then it finds the remaining tasks, then a sentinel
    assert drain(q) == ["a", "b", "c"]
    assert q.counters().pending == 0


def test_take_without_timeout_returns_a_sentinel_on_a_closed_drained_queue(
    make_queue: QueueFactory,
) -> None:
    # A consumer attached when the queue closed gets its sentinel.  (It used to
    # attach after the close; a closed, drained queue is now idle, and idle is
    # new: see the next test.)
    q = make_queue()
    q.attach_consumer()
    q.close()
    got = []

    thread = threading.Thread(target=lambda: got.append(q.take(1, timeout=None)), daemon=True)
    thread.start()
    thread.join(5)

    assert not thread.is_alive(), "take(timeout=None) blocked on a closed, empty queue"
    (lease,) = got
    assert lease is not None and lease.sentinel is not None
    q.ack(lease)


@pytest.mark.idle_is_new
def test_a_consumer_attaching_to_an_idle_queue_waits_for_the_next_run(
    make_queue: QueueFactory,
) -> None:
    # Given a queue whose run has finished: closed, every task acknowledged
    q = make_queue()
    q.attach_consumer()
    q.put("first run")
    q.close()
    assert drain(q) == ["first run"]
    q.detach_consumer()
    assert q.state() == "idle"

    # When a consumer attaches
    late = make_queue.handle(q)
    late.attach_consumer()

    # Then it waits for the next producer instead of stopping, and takes part
    # in that run up to its sentinel
    assert late.take(1, timeout=0.3) is None
    q.attach_producer()
    assert q.state() == "open"
    q.put("second run")
    q.detach_producer()
    assert drain(late) == ["second run"]
    assert q.state() == "idle"


def test_state_says_open_closing_or_idle(make_queue: QueueFactory) -> None:
    q = make_queue()
    assert q.state() == "open"
    q.put("t")
    q.close()
    assert q.state() == "closing"
    q.attach_consumer()
    assert drain(q) == ["t"]
    assert q.state() == "idle"


def test_a_retry_due_after_close_is_handled_before_the_sentinel(
    make_queue: QueueFactory,
) -> None:
    # Given a task waiting for its retry
    q = make_queue()
    q.attach_consumer()
    q.put("flaky")
    lease = take_lease(q)
    q.ack(lease, [Failure(e, "E", "tb", retry_in=0.2) for e in lease.envelopes()])

    # When the queue is closed
    q.close()

    # Then the consumer handles the retry before it stops: join cannot hang
    assert drain(q) == ["flaky"]
    c = q.counters()
    assert (c.done, c.retried, c.pending) == (1, 1, 0)


def test_join_waits_until_every_task_is_acknowledged(make_queue: QueueFactory) -> None:
    q = make_queue()
    assert q.join(timeout=1)  # nothing put: returns at once
    q.attach_consumer()
    q.put("a")
    q.put("b")

    assert q.join(timeout=0.05) is False
    lease = take_lease(q)
    q.ack(lease)
    assert q.join(timeout=0.05) is False

    joined = []
    thread = threading.Thread(target=lambda: joined.append(q.join(timeout=10)), daemon=True)
    thread.start()
    lease = take_lease(q)
    q.ack(lease)
    thread.join(10)
    assert joined == [True]


def test_join_waits_for_a_task_being_retried(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("flaky")
    lease = take_lease(q)
    (env,) = lease.envelopes()
    q.ack(lease, [Failure(env, "E", "tb", retry_in=0.05)])

    assert q.join(timeout=0.05) is False
    lease = take_lease(q)
    q.ack(lease)
    assert q.join(timeout=1)


@pytest.mark.timeout(30)
def test_put_blocks_while_the_queue_is_full(make_queue: QueueFactory) -> None:
    # Given a full queue
    q = make_queue(maxsize=2)
    q.put(1)
    q.put(2)

    # When a producer puts one more
    producer = make_queue.handle(q)
    finished = threading.Event()

    def produce() -> None:
        producer.put(3)
        finished.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()

    # Then it waits until a consumer takes a task
    assert not finished.wait(0.3), "put did not block on a full queue"
    q.attach_consumer()
    lease = take_lease(q)
    wait_for(finished.is_set, timeout=5, message="the blocked put")
    thread.join(5)
    q.ack(lease)
    assert q.counters().produced == 3
    assert take_bodies(q, 2) == [2, 3]


@pytest.mark.timeout(30)
def test_ready_tasks_stay_near_maxsize_while_a_producer_runs_ahead(
    make_queue: QueueFactory,
) -> None:
    maxsize = 4
    q = make_queue(maxsize=maxsize)
    producer = make_queue.handle(q)
    thread = threading.Thread(target=lambda: producer.put_many(range(40)), daemon=True)
    thread.start()
    q.attach_consumer()
    most_ready = 0
    handled: list[int] = []

    # The consumer takes a task only once the queue is full (or the producer done)
    while len(handled) < 40:
        wait_for(lambda: q.counters().ready >= maxsize or not thread.is_alive(), timeout=5)
        most_ready = max(most_ready, q.counters().ready)
        handled += take_bodies(q, 1)
    thread.join(5)

    assert handled == list(range(40))
    assert maxsize <= most_ready <= maxsize + 1
