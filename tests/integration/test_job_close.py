"""The job engine lets go of its hold on the first queue once every producer
process has registered (issue #20 item 3): the last producer's own detach
closes the queue the moment it is done, with no wait for the job to see its
process end — what a pcq.map caller, who ticks its job only between results,
waited for at the end of every map.  Real producer processes, local backend."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for

from pcq.backends.local import LocalQueue
from pcq.job import Job


def _produce_until(gate: Path) -> Iterator[int]:
    yield 1
    while not gate.exists():  # the test says when this producer is done
        time.sleep(0.005)
    yield 2


def _job(queue: LocalQueue, gate: Path) -> Job:
    job = Job([], first=queue, produce=lambda: _produce_until(gate), producers=1, wait=False)
    job.start()
    # The job's hold, the producer's own registration, and its first item (put
    # after it said it registered)
    wait_for(lambda: (c := queue.counters()).producers == 2 and c.produced == 1,
             message="the producer registered and putting")
    job.tick(0)  # the job sees every producer registered
    return job


@pytest.mark.timeout(30)
def test_the_last_producer_closes_the_queue_itself_once_the_job_let_go(tmp_path: Path) -> None:
    # Given a job whose one producer has registered, and a tick after that
    queue = LocalQueue("close-own")
    gate = tmp_path / "gate"
    job = _job(queue, gate)
    try:
        assert not queue.counters().closed
        # When the producer finishes, and the job does not tick again
        gate.touch()
        # Then the queue closes by the producer's own detach, all it put in it
        c = wait_for(lambda: (c := queue.counters()).closed and c, message="the close")
        assert (c.produced, c.producers) == (2, 0), c
        # And the job, ticked later, ends without closing it twice
        closes = queue._broker.ledgers["close-own"].closes  # type: ignore[union-attr]
        wait_for(lambda: not job.tick(0.05), message="the job's end")
        assert queue._broker.ledgers["close-own"].closes == closes  # type: ignore[union-attr]
    finally:
        job.stop()
        queue.dispose()


@pytest.mark.timeout(30)
def test_a_producer_killed_after_the_job_let_go_is_detached_and_the_queue_closes(
    tmp_path: Path,
) -> None:
    # Given a job whose one producer has registered, and a tick after that
    queue = LocalQueue("close-killed")
    job = _job(queue, tmp_path / "gate")
    try:
        producer = next(iter(job._running.values()))
        # When the producer is SIGKILLed before it is done
        os.kill(producer.pid, signal.SIGKILL)
        # Then the job, at the tick that sees it dead, closes the queue (it
        # was the last producer) and ends, counting a producer error
        wait_for(lambda: not job.tick(0.05), message="the job's end")
        c = queue.counters()
        assert (c.closed, c.producers, c.produced) == (True, 0, 1), c
        assert job.producer_errors == 1
    finally:
        job.stop()
        queue.dispose()
