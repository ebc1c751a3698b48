"""Read-ahead on the local backend (issue #20 item 2): a consumer at concurrency
1 takes its next lease while the current one runs.  A real consumer process,
SIGKILLed while it holds a lease taken ahead: that lease was never started, so
it goes back with no death counted, and the running one is the only suspect."""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import Connection
from typing import Any

import pytest
from helpers import wait_for

from pcq.backends.local import LocalQueue
from pcq.envelope import Batch
from pcq.settings import fork_context


def _bodies(lease: Any) -> list[Any]:
    return [body for batch in lease.batches if isinstance(batch, Batch) for body in batch.bodies]


def _consumer(queue: LocalQueue, acks: int, report: Connection) -> None:
    """Take one task with read-ahead on, acknowledge ``acks`` leases (each ack
    takes the next lease), report what it runs now, then wait to be killed."""
    queue.attach_consumer()
    queue.read_ahead(True)
    lease = queue.take(1, timeout=5)
    for _ in range(acks):
        assert lease is not None
        lease = queue.ack_and_take(lease, max_tasks=1, timeout=5)
    report.send(_bodies(lease))
    signal.pause()


def _killed_holding(queue: LocalQueue, acks: int) -> list[Any]:
    """Run ``_consumer`` in a forked process, SIGKILL it once it holds two
    leases (the one it runs and the one taken ahead); what it was running."""
    mine, theirs = fork_context().Pipe()
    proc = fork_context().Process(target=_consumer, args=(queue, acks, theirs))
    proc.start()
    try:
        assert mine.poll(10), "the consumer reported nothing"
        running = mine.recv()
        wait_for(lambda: queue.counters().in_flight == 2, message="a lease taken ahead")
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: queue.counters().in_flight == 0, message="the leases returned")
    finally:
        proc.kill()
        proc.join(5)
    return list(running)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("acks", [0, 1])
def test_a_lease_taken_ahead_comes_back_with_no_death_when_its_consumer_is_killed(
    acks: int,
) -> None:
    # Given single tasks a, b, c and a queue that dead-letters a task at its
    # first consumer death
    queue = LocalQueue(f"ahead-{acks}", max_deliveries=1)
    try:
        for item in "abc":
            queue.put(item)
        # When a consumer runs its first task (acks=0) or, having acknowledged
        # it, its second (acks=1), holds the next one taken ahead, and is killed
        running = _killed_holding(queue, acks)
        # Then only the task it was running is dead-lettered; the one taken
        # ahead is ready again, unharmed, and nothing is lost
        assert running == [["a", "b"][acks]]
        c = queue.counters()
        assert (c.done, c.dead, c.ready, c.in_flight) == (acks, 1, 2 - acks, 0), c
        letters = queue.dead_letters()
        assert [d["body"] for d in letters] == running, letters
        assert "consumer died 1 times" in letters[0]["error"]
    finally:
        queue.dispose()


def _detaching(queue: LocalQueue, report: Connection) -> None:
    queue.attach_consumer()
    queue.read_ahead(True)
    lease = queue.take(1, timeout=5)
    report.send(_bodies(lease))
    queue.detach_consumer()  # a stop: its lease given back, and the one taken ahead
    report.send("detached")
    signal.pause()


@pytest.mark.timeout(30)
def test_a_consumer_that_detaches_hands_back_the_lease_it_took_ahead() -> None:
    # Given two single tasks and a consumer that takes one with read-ahead on
    queue = LocalQueue("ahead-detach", max_deliveries=1)
    mine, theirs = fork_context().Pipe()
    proc = fork_context().Process(target=_detaching, args=(queue, theirs))
    try:
        queue.put("a")
        queue.put("b")
        proc.start()
        # When it detaches (its stop) holding both
        assert mine.poll(10) and mine.recv() == ["a"]
        assert mine.poll(10) and mine.recv() == "detached"
        # Then both are ready again, no death counted, nothing in flight
        c = queue.counters()
        assert (c.ready, c.in_flight, c.dead, c.done) == (2, 0, 0, 0), c
    finally:
        proc.kill()
        proc.join(5)
        queue.dispose()


def _suspect_first(queue: LocalQueue, report: Connection) -> None:
    queue.attach_consumer()
    queue.read_ahead(True)
    lease = queue.take(1, timeout=5)
    assert lease is not None
    report.send(_bodies(lease))
    queue.ack(lease)  # read after the take-ahead's reply: it settles after that take
    report.send("acked")
    signal.pause()


@pytest.mark.timeout(30)
def test_a_suspect_runs_alone_with_no_lease_taken_ahead_beside_it() -> None:
    # Given task a, suspect after its consumer was killed running it, and b, c ready
    queue = LocalQueue("ahead-suspect", max_deliveries=3)
    mine, theirs = fork_context().Pipe()
    proc = fork_context().Process(target=_suspect_first, args=(queue, theirs))
    try:
        for item in "abc":
            queue.put(item)
        assert _killed_holding(queue, 0) == ["a"]
        # When a fresh consumer with read-ahead on takes, then acknowledges
        proc.start()
        assert mine.poll(10) and mine.recv() == ["a"]
        assert mine.poll(10) and mine.recv() == "acked"
        # Then it got the suspect alone: nothing was taken ahead beside it
        c = queue.counters()
        assert (c.done, c.ready, c.in_flight, c.dead) == (1, 2, 0, 0), c
    finally:
        proc.kill()
        proc.join(5)
        queue.dispose()
