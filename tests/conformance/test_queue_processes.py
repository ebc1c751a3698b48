"""Conformance with real consumer processes: a consumer SIGKILLed mid-task,
several consumer processes and their sentinels.

These tests fork children that use the queue, so they are generated only for
backends whose queues can cross a fork (``Backend.multiprocess``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import Counter
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import pytest
from helpers import take_lease, wait_for

from pcq.backends.base import Failure, Queue

if TYPE_CHECKING:
    from conftest import QueueFactory

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

fork = mp.get_context("fork")


def _take_and_hang(queue: Queue, report: Connection) -> None:
    """Child: take one lease, report its task ids, then wait to be killed."""
    queue.attach_consumer()
    lease = take_lease(queue)
    report.send([env.id for env in lease.envelopes()])
    signal.pause()


def _start_hanging_consumer(queue: Queue) -> tuple[Any, list[str]]:
    """A child consumer holding one lease; (process, its task ids)."""
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_take_and_hang, args=(queue, theirs), daemon=True)
    child.start()
    assert mine.poll(10), "the child consumer took nothing"
    taken: list[str] = mine.recv()
    return child, taken


def _kill(child: Any) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL


def test_a_killed_consumers_task_is_delivered_to_another(make_queue: QueueFactory) -> None:
    # Given a consumer process that took a task and was SIGKILLed mid-task
    q = make_queue()
    q.put("survivor")
    child, taken = _start_hanging_consumer(q)
    assert q.counters().in_flight == 1
    _kill(child)

    # When it is evicted (a supervisor saw it die)
    q.attach_consumer()
    assert q.evict(child.pid) == 1

    # Then the task is delivered again, unchanged, and counted once when handled
    lease = take_lease(q)
    assert [(e.id, e.body, e.attempts) for e in lease.envelopes()] == [(taken[0], "survivor", 0)]
    q.ack(lease)
    c = q.counters()
    assert (c.produced, c.done, c.failed, c.pending) == (1, 1, 0, 0)


def test_reap_finds_a_consumer_that_died(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put_many(["a", "b"])
    child, taken = _start_hanging_consumer(q)
    q.attach_consumer()
    assert q.reap() == 0  # alive: nothing to reap
    _kill(child)

    wait_for(lambda: q.reap() > 0, timeout=30, message="the dead consumer's tasks reaped")

    ids = []
    while len(ids) < 2:
        lease = take_lease(q)
        ids += [e.id for e in lease.envelopes()]
        q.ack(lease)
    assert set(taken) <= set(ids) and len(ids) == 2
    assert q.counters().pending == 0
    assert q.join(timeout=1)


def test_join_does_not_hang_when_a_consumer_dies(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put("t")
    child, _ = _start_hanging_consumer(q)
    _kill(child)
    q.attach_consumer()

    # join reaps while it waits: the task is ready again, not lost in flight
    assert q.join(timeout=0.3) is False
    lease = take_lease(q, timeout=30)
    q.ack(lease)

    assert q.join(timeout=5)


def _consume_until_sentinel(queue: Queue, report: Connection) -> None:
    """Child: handle tasks until the sentinel; report (bodies, sentinels seen)."""
    queue.attach_consumer()
    bodies: list[Any] = []
    sentinels = 0
    while sentinels == 0:
        lease = take_lease(queue, timeout=30)
        bodies += [env.body for env in lease.envelopes()]
        sentinels += lease.sentinel is not None
        queue.ack(lease)
    queue.detach_consumer()
    report.send((os.getpid(), bodies, sentinels))


def test_consumer_processes_handle_every_task_once_and_stop_at_one_sentinel(
    make_queue: QueueFactory,
) -> None:
    q = make_queue()
    mine, theirs = fork.Pipe(duplex=False)
    children = [
        fork.Process(target=_consume_until_sentinel, args=(q, theirs), daemon=True)
        for _ in range(3)
    ]
    for child in children:
        child.start()
    wait_for(lambda: q.counters().consumers == 3, message="three consumers attached")

    q.attach_producer()
    q.put_many(range(60))
    q.detach_producer()  # the last producer closes: one sentinel per consumer

    reports = [mine.recv() for _ in children if mine.poll(30)]
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    assert len(reports) == 3
    assert [sentinels for _, _, sentinels in reports] == [1, 1, 1]
    handled = Counter(body for _, bodies, _ in reports for body in bodies)
    assert handled == Counter(range(60))
    c = q.counters()
    assert (c.produced, c.done, c.pending) == (60, 60, 0)


def _fail_then_hang(queue: Queue, report: Connection) -> None:
    """Child: fail its task with a long retry delay, then take and hold another."""
    queue.attach_consumer()
    lease = take_lease(queue)
    queue.ack(lease, [Failure(env, "E", "tb", retry_in=3600) for env in lease.envelopes()])
    lease = take_lease(queue)
    report.send([env.id for env in lease.envelopes()])
    signal.pause()


def test_a_killed_consumer_loses_neither_its_lease_nor_its_retries(
    make_queue: QueueFactory,
) -> None:
    # Given a consumer that holds a retry and a lease when it is killed
    q = make_queue()
    q.put("retried")
    q.put("held")
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_fail_then_hang, args=(q, theirs), daemon=True)
    child.start()
    assert mine.poll(10)
    mine.recv()
    _kill(child)

    # When it is evicted
    q.attach_consumer()
    q.evict(child.pid)

    # Then both tasks are still pending and the held one is delivered again
    # (the retry may come back at once, or after its delay: never lost)
    c = q.counters()
    assert (c.pending, c.retried, c.done) == (2, 1, 0)
    attempts: dict[str, int] = {}
    while "held" not in attempts:
        lease = take_lease(q)
        attempts.update((e.body, e.attempts) for e in lease.envelopes())
        q.ack(lease)
    assert attempts["held"] == 0
    assert attempts.get("retried", 1) == 1
    assert q.counters().pending == (0 if "retried" in attempts else 1)
