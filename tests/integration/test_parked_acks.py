"""A stage's ack whose outputs find their queue full waits in the local broker,
as a put does (issue #20 item 3): its lease stays in flight, nothing is put,
and it is applied whole once there is room.  Real consumer processes, SIGKILLed
or stopped while their ack waits: nothing is lost, no output is put twice, and
a death counts against the lease that was running, never against the finished
one whose ack waited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from helpers import finish, wait_for
from helpers_cli import ROOT

from pcq.backends.local import LocalQueue
from pcq.envelope import Batch
from pcq.settings import fork_context


def _bodies(lease: Any) -> list[Any]:
    return [body for batch in lease.batches if isinstance(batch, Batch) for body in batch.bodies]


def _queues(name: str, room: int, **options: Any) -> tuple[LocalQueue, LocalQueue]:
    """Input queue ``name`` and its stage's next queue, bounded at ``room``
    tasks and filled to it."""
    inq = LocalQueue(name, **options)
    out = inq.sibling(f"{name}.2", maxsize=room)
    for k in range(room):
        out.put(f"old-{k}")
    return inq, out


def _stage(inq: LocalQueue, out: LocalQueue, ahead: bool, report: Connection) -> None:
    """A stage's consumer: take one task, acknowledge it with one output (with
    ``ahead``: read-ahead on, so the ack goes with a take ahead and the next
    lease runs at once), say what it runs then, report how the ack ended."""
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    inq.attach_consumer()
    inq.unpark_when(lambda: bool(stop))
    inq.read_ahead(ahead)
    lease = inq.take(1, timeout=5)
    assert lease is not None
    if ahead:
        running = inq.ack_and_take(lease, max_tasks=1, timeout=5,
                                   outputs=[f"out-{_bodies(lease)[0]}"], to=out)
        report.send(["running", _bodies(running)])
        report.send(["acked", inq.ack(running)])  # reads the first ack's reply first
    else:
        report.send(["running", []])
        report.send(["acked", inq.ack(lease, outputs=[f"out-{_bodies(lease)[0]}"], to=out)])
    signal.pause()


@pytest.fixture
def started() -> Any:
    """The stage processes a test started: killed, joined and their pipes
    closed at its end, whatever happened."""
    procs: list[Any] = []
    yield procs
    for proc in procs:
        _stop(proc)


def _start(inq: LocalQueue, out: LocalQueue, started: list[Any], ahead: bool = False) -> Any:
    mine, theirs = fork_context().Pipe()
    proc = fork_context().Process(target=_stage, args=(inq, out, ahead, theirs))
    proc.reports = mine  # type: ignore[attr-defined]
    proc.start()
    started.append(proc)
    theirs.close()  # the child's end; its own copy stays open there
    assert mine.poll(10), "the stage reported nothing"
    proc.running = mine.recv()[1]  # type: ignore[attr-defined]
    return proc


def _stop(proc: Any) -> None:
    proc.kill()
    proc.join(5)
    proc.reports.close()  # now, not at some later garbage collection


def _taken_from(queue: LocalQueue, n: int) -> list[Any]:
    queue.attach_consumer()
    lease = queue.take(n, timeout=5)
    assert lease is not None
    queue.ack(lease)
    return _bodies(lease)


@pytest.mark.timeout(30)
def test_an_ack_whose_outputs_find_their_queue_full_waits_for_room_and_is_applied_whole(
    started: list[Any],
) -> None:
    # Given a stage's next queue full (2 of 2) and one task for the stage
    inq, out = _queues("parked", room=2)
    inq.put("a")
    try:
        # When the stage acknowledges its task with an output
        proc = _start(inq, out, started)
        # Then the ack waits: its lease in flight, nothing done, nothing put
        wait_for(lambda: not proc.reports.poll(0.05) and inq.counters().in_flight == 1)
        assert not proc.reports.poll(0.3), "the ack was answered while its queue was full"
        c, o = inq.counters(), out.counters()
        assert (c.in_flight, c.done, o.ready, o.produced) == (1, 0, 2, 2), (c, o)
        # When the next stage takes from the full queue
        assert _taken_from(out, 1) == ["old-0"]
        # Then the ack goes through whole: its task done, its output put, once
        assert proc.reports.poll(10) and proc.reports.recv() == ["acked", True]
        c, o = inq.counters(), out.counters()
        assert (c.in_flight, c.done, o.ready, o.produced) == (0, 1, 2, 3), (c, o)
        assert _taken_from(out, 5) == ["old-1", "out-a"]
    finally:
        out.dispose()
        inq.dispose()


@pytest.mark.timeout(30)
def test_a_stage_killed_while_its_ack_waits_loses_nothing_and_puts_nothing(
    started: list[Any],
) -> None:
    # Given a full next queue, a queue that dead-letters a task at its first
    # consumer death, and a stage whose ack of task a waits for room
    inq, out = _queues("parked-kill", room=2, max_deliveries=1)
    inq.put("a")
    try:
        proc = _start(inq, out, started)
        wait_for(lambda: inq.counters().in_flight == 1, message="the lease in flight")
        assert not proc.reports.poll(0.2)
        # When the stage is SIGKILLed there
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: inq.counters().in_flight == 0, message="the lease returned")
        # Then its task is ready again, fresh (it had finished: no death is
        # counted against it), and its output was never put
        c, o = inq.counters(), out.counters()
        assert (c.ready, c.done, c.dead, o.ready, o.produced) == (1, 0, 0, 2, 2), (c, o)
        # And room coming later puts nothing for the dead stage
        assert _taken_from(out, 5) == ["old-0", "old-1"]
        assert out.counters().produced == 2
        assert _taken_from(inq, 1) == ["a"]
    finally:
        out.dispose()
        inq.dispose()


@pytest.mark.timeout(30)
def test_a_death_while_an_ack_waits_counts_against_the_lease_running_after_it(
    started: list[Any],
) -> None:
    # Given a full next queue, tasks a, b, c on a queue that dead-letters a task
    # at its first consumer death, and a stage with read-ahead: its ack of a
    # (with a's output) waits for room while it runs b, taken ahead
    inq, out = _queues("parked-ahead", room=2, max_deliveries=1)
    for item in "abc":
        inq.put(item)
    try:
        proc = _start(inq, out, started, ahead=True)
        assert proc.running == ["b"]
        wait_for(lambda: inq.counters().in_flight == 2, message="a waiting, b running")
        # When the stage dies running b
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: inq.counters().in_flight == 0, message="the leases returned")
        # Then b, which was running, is the one its death counts against; a is
        # ready again, fresh, and its output was never put
        c, o = inq.counters(), out.counters()
        assert (c.dead, c.ready, c.done, o.produced) == (1, 2, 0, 2), (c, o)
        assert [d["body"] for d in inq.dead_letters()] == ["b"]
        assert sorted(_taken_from(inq, 5)) == ["a", "c"]
    finally:
        out.dispose()
        inq.dispose()


@pytest.mark.timeout(30)
def test_a_stage_that_stops_while_its_ack_waits_is_let_through_over_the_bound(
    started: list[Any],
) -> None:
    # Given a full next queue and a stage whose ack of task a waits for room
    inq, out = _queues("parked-stop", room=2)
    inq.put("a")
    try:
        proc = _start(inq, out, started)
        wait_for(lambda: inq.counters().in_flight == 1, message="the lease in flight")
        assert not proc.reports.poll(0.2)
        # When the stage is asked to stop (SIGTERM)
        os.kill(proc.pid, signal.SIGTERM)
        # Then its ack goes through at once, whole, over the bound: a stop never
        # waits for the next stage, and the output is put once
        assert proc.reports.poll(5) and proc.reports.recv() == ["acked", True]
        c, o = inq.counters(), out.counters()
        assert (c.in_flight, c.done, o.ready, o.produced) == (0, 1, 3, 3), (c, o)
        assert _taken_from(out, 5) == ["old-0", "old-1", "out-a"]
    finally:
        out.dispose()
        inq.dispose()


@pytest.mark.timeout(90)
def test_a_pipeline_stopped_while_its_first_stage_waits_for_room_stops_at_once(
    tmp_path: Path,
) -> None:
    # Given a pipeline whose second queue holds 2 tasks and whose second stage
    # is slow: once that stage runs, the first stage's acks wait for room
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "tests/apps/parking.py", str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: (tmp_path / "slow-started").exists(), timeout=30,
             message="the slow stage's first task")
    # When the job is interrupted (its grace is 30 s)
    asked = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    done = finish(proc, timeout=60)
    # Then it stops at once, not at the end of its grace: the waiting acks went
    # through, and every task the first stage acknowledged put its one output
    assert time.monotonic() - asked < 10, done.stderr
    summary = json.loads(done.stdout)
    assert summary["exit_code"] == 130, done.stderr
    (made, forwarded), (received, _) = summary["stages"]
    assert 0 < forwarded == received <= made, summary
