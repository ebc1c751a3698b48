"""What only the local backend does: batch sizing, backpressure in tasks, the
broker settling a closed connection at once, deaths and poison tasks, siblings
on one broker, its temp dir."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
from helpers import take_bodies, take_lease, wait_for

from pcq.backends import local_wire, open_queue
from pcq.backends.base import MAX_BATCH, Failure, Queue
from pcq.backends.local import LocalQueue

fork = mp.get_context("fork")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_local() -> Iterator[Callable[..., LocalQueue]]:
    made: list[LocalQueue] = []

    def make(maxsize: int = 0, max_deliveries: int = 3) -> LocalQueue:
        q = LocalQueue("unit", maxsize=maxsize, max_deliveries=max_deliveries)
        made.append(q)
        return q

    yield make
    for q in made:
        q.dispose()


# ---------------------------------------------------------------- batch sizing


def test_open_queue_local_is_a_local_queue() -> None:
    q = open_queue("local", maxsize=16, max_deliveries=5)
    try:
        assert isinstance(q, LocalQueue) and (q.maxsize, q.max_deliveries) == (16, 5)
    finally:
        q.dispose()


def test_batches_are_single_tasks_until_a_consumer_reports_a_cost(make_local: Any) -> None:
    q = make_local()
    assert q.batch_limit() == 1


@pytest.mark.parametrize(
    ("maxsize", "cost", "limit"),
    [
        (0, 1e-7, MAX_BATCH),  # cheap tasks, unbounded queue: the largest batch
        (0, 1e-4, 50),  # 5 ms of work per batch
        (16, 1e-7, MAX_BATCH),  # a small maxsize does not force tiny batches
        (16, 1e-4, 50),
        (3, 1e-3, 5),
        (0, 0.5, 1),  # slow handler: one task per batch, so tasks spread out
    ],
)
def test_batch_limit_follows_the_reported_cost(
    make_local: Any, maxsize: int, cost: float, limit: int
) -> None:
    q = make_local(maxsize)
    q.note_task_cost(cost)
    assert q.batch_limit() == limit


def test_reported_costs_are_smoothed(make_local: Any) -> None:
    q = make_local()
    q.note_task_cost(1e-4)  # alone: batches of 50
    q.note_task_cost(1e-3)  # alone: batches of 5; moves the estimate a quarter of the way
    assert q.batch_limit() == 15


def test_put_many_ships_batches_and_in_flight_counts_tasks(make_local: Any) -> None:
    q = make_local(16)
    q.note_task_cost(1e-6)  # batches of 5 ms of work: more than maxsize tasks
    q.attach_consumer()

    producer = copy.copy(q)
    thread = threading.Thread(target=producer.put_many, args=(range(40),), daemon=True)
    thread.start()

    sizes, bodies = [], []
    while len(bodies) < 40:
        lease = q.take(MAX_BATCH, timeout=5)
        assert lease is not None
        sizes.append(lease.size)
        assert q.counters().in_flight == lease.size
        bodies += [e.body for e in lease.envelopes()]
        q.ack(lease)
    thread.join(5)
    producer.dispose()
    assert bodies == list(range(40))
    # Whole batches bigger than maxsize, never tiny ones (the 1 ms linger may
    # send a partial one on a loaded machine)
    assert max(sizes) > 16 and len(sizes) <= 8, sizes


def test_a_take_of_fewer_tasks_than_a_stored_batch_splits_it(make_local: Any) -> None:
    # Given one stored batch of 8 tasks
    q = make_local()
    q.note_task_cost(1e-7)
    q._put_bodies(list(range(8)))
    q.attach_consumer()
    # When takes ask for fewer, each gets what it asked for, ids kept
    sizes, ids = [], []
    for want in (3, 1, 8):
        lease = q.take(want, timeout=5)
        assert lease is not None
        sizes.append(lease.size)
        ids += [env.id for env in lease.envelopes()]
        q.ack(lease)
    assert sizes == [3, 1, 4]
    tag = ids[0].rsplit("-", 1)[0]
    assert ids == [f"{tag}-{i}" for i in range(8)]
    assert q.counters().pending == 0


def test_a_trickle_is_sent_as_it_comes(make_local: Any) -> None:
    q = make_local()
    q.note_task_cost(1e-7)  # batches could be large
    q.attach_consumer()

    def slowly() -> Iterator[int]:
        for n in range(3):
            time.sleep(0.01)  # a producer much slower than LINGER_SECONDS
            yield n

    q.put_many(slowly())

    assert [take_lease(q).size for _ in range(3)] == [1, 1, 1]


def test_backpressure_counts_tasks_and_overshoots_by_one_batch_at_most(
    make_local: Any,
) -> None:
    # Given a queue of maxsize 8 holding 5 ready tasks
    q = make_local(8)
    q._put_bodies(list(range(5)))
    # When a batch of 5 comes, there is room (5 < 8): 10 ready, one batch over
    q._put_bodies(list(range(5, 10)))
    assert q.counters().ready == 10
    # Then the next put waits until fewer than 8 are ready
    finished = threading.Event()
    producer = copy.copy(q)  # a second connection, as a second process has
    thread = threading.Thread(target=lambda: (producer._put_bodies([10]), finished.set()))
    thread.start()
    assert not finished.wait(0.3)
    q.attach_consumer()
    lease = q.take(3, timeout=5)  # 3 of the first batch (split): 7 ready left
    assert lease is not None and lease.size == 3
    assert finished.wait(5)
    thread.join(5)
    q.ack(lease)
    producer.dispose()
    assert q.counters().ready == 8


# ---------------------------------------------------------------- a closed connection


def _take_and_hang(queue: Queue, max_tasks: int, report: Connection) -> None:
    queue.attach_consumer()
    lease = queue.take(max_tasks, timeout=10)
    assert lease is not None
    report.send([env.body for env in lease.envelopes()])
    signal.pause()


def _hanging_consumer(q: Queue, max_tasks: int = 1) -> tuple[Any, list[Any]]:
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_take_and_hang, args=(q, max_tasks, theirs), daemon=True)
    child.start()
    assert mine.poll(10), "the child took nothing"
    bodies: list[Any] = mine.recv()
    return child, bodies


def _kill(child: Any) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)


def test_a_dead_consumers_lease_is_back_at_once_without_reap_or_evict(
    make_local: Any,
) -> None:
    q = make_local()
    q.put_many(["a", "b"])
    child, taken = _hanging_consumer(q)
    q.attach_consumer()

    _kill(child)

    # take alone finds the task: no reap, no evict
    lease = take_lease(q, timeout=5)
    assert [e.body for e in lease.envelopes()] == taken
    q.ack(lease)
    assert q.reap() == 1  # reports what the broker returned
    assert q.reap() == 0


def test_after_a_death_each_task_comes_back_alone_with_the_death_counted(
    make_local: Any,
) -> None:
    # Given a consumer that died holding one batch of four tasks
    q = make_local()
    q.note_task_cost(1e-7)
    q._put_bodies(["p", "i1", "i2", "i3"])
    child, taken = _hanging_consumer(q, max_tasks=10)
    assert taken == ["p", "i1", "i2", "i3"]
    _kill(child)

    # Then the tasks come back one lease each, in order, even to a greedy take
    q.attach_consumer()
    got = []
    for _ in range(4):
        lease = q.take(10, timeout=5)
        assert lease is not None and lease.size == 1
        got += [e.body for e in lease.envelopes()]
        q.ack(lease)
    assert got == taken
    assert q.counters().pending == 0


def _bodies(lease: Any) -> list[Any]:
    assert lease is not None
    return [env.body for env in lease.envelopes()]


def test_a_suspect_runs_where_no_other_lease_runs(make_local: Any) -> None:
    # Given a suspect (a consumer died holding it), then three fresh tasks
    q = make_local()
    q.put("s1")
    child, _ = _hanging_consumer(q)
    _kill(child)
    q.put_many(["f1", "f2", "f3"])
    one, two = copy.copy(q), copy.copy(q)
    one.attach_consumer()
    two.attach_consumer()
    # When a consumer holds a suspect, it is handed nothing more until it settles it
    suspect = one.take(4, timeout=5)
    assert _bodies(suspect) == ["s1"]
    assert one.take(4, timeout=0.2) is None
    fresh = two.take(1, timeout=5)
    assert _bodies(fresh) == ["f1"]
    # ... a consumer holding any lease is handed no suspect, nor a fresh task
    # while a suspect waits (it drains, and an idle one takes the suspect)
    child, taken = _hanging_consumer(q)
    assert taken == ["f2"]
    _kill(child)
    assert two.take(4, timeout=0.2) is None
    assert suspect is not None and fresh is not None
    one.ack(suspect)
    assert _bodies(one.take(4, timeout=5)) == ["f2"]
    assert one.take(4, timeout=0.2) is None
    two.ack(fresh)
    assert _bodies(two.take(4, timeout=5)) == ["f3"]
    for consumer in (one, two):
        consumer.dispose()


def test_a_task_whose_consumers_keep_dying_is_dead_lettered(make_local: Any) -> None:
    # Given max_deliveries 2 and a poison task among innocent ones
    q = make_local(max_deliveries=2)
    q.note_task_cost(1e-7)
    q._put_bodies(["poison", "innocent"])

    # When two consumers in a row die holding it
    child, taken = _hanging_consumer(q, max_tasks=10)
    assert taken == ["poison", "innocent"]
    _kill(child)
    child, taken = _hanging_consumer(q, max_tasks=10)
    assert taken == ["poison"]  # alone now
    _kill(child)

    # Then it is a dead letter, counted failed, and the innocent task is handled
    q.attach_consumer()
    assert take_bodies(q, 1) == ["innocent"]
    wait_for(lambda: q.counters().pending == 0, message="the poison task settled")
    c = q.counters()
    assert (c.produced, c.done, c.failed, c.dead) == (2, 1, 1, 1)
    (letter,) = q.dead_letters()
    assert letter["body"] == "poison"
    assert letter["error"] == "consumer died 2 times while handling it"


# ---------------------------------------------------------------- a kill for a timeout


def _take_then_ack_late(queue: Queue, conn: Connection) -> None:
    """Take a batch, report its ids, and on the parent's word acknowledge it all
    done (a handler that swallowed its timeout), report whether that applied."""
    queue.attach_consumer()
    lease = queue.take(10, timeout=10)
    assert lease is not None
    conn.send([(env.body, env.id) for env in lease.envelopes()])
    conn.recv()
    conn.send(queue.ack(lease))
    signal.pause()


@pytest.mark.parametrize("retry", [False, True])
def test_a_consumer_killed_for_a_timeout_fails_that_task_and_counts_no_death(
    make_local: Any, retry: bool
) -> None:
    # Given a consumer holding one batch of three tasks, the first past its
    # timeout, on a queue where a single death dead-letters a task
    q = make_local(max_deliveries=1)
    q.note_task_cost(1e-7)
    q._put_bodies(["slow", "b", "c"])
    mine, theirs = fork.Pipe()
    child = fork.Process(target=_take_then_ack_late, args=(q, theirs), daemon=True)
    child.start()
    assert mine.poll(10), "the child took nothing"
    taken = dict(mine.recv())
    assert list(taken) == ["slow", "b", "c"]

    # When its supervisor says it will kill it, and the handler's ack comes late
    q.killing(child.pid, taken["slow"])
    mine.send("ack now")
    assert mine.poll(10) and mine.recv() is False  # the lease is gone: commits nothing
    assert q.counters().done == 0
    _kill(child)
    assert q.counters().in_flight == 3  # set aside, not returned by the close

    # Then the supervisor fails that task and the others come back, no death
    def failure(env: Any) -> Failure:
        assert env.body == "slow"
        return Failure(env, "TaskTimeout: too slow", retry_in=0.01 if retry else None)

    assert q.fail_running(child.pid, taken["slow"], failure) is True
    assert q.fail_running(child.pid, taken["slow"], failure) is False  # once only
    assert q.release(child.pid) == 0  # the settle gave the others back already
    q.attach_consumer()
    wanted = ["b", "c", "slow"] if retry else ["b", "c"]
    got: list[Any] = []
    while len(got) < len(wanted):
        lease = q.take(10, timeout=5)
        assert lease is not None and lease.deaths == 0
        got += [e.body for e in lease.envelopes()]
        assert all(e.attempts == (e.body == "slow") for e in lease.envelopes())
        q.ack(lease)
    assert got == wanted
    c = q.counters()
    assert (c.pending, c.done, c.retried) == (0, len(wanted), int(retry))
    assert (c.failed, c.dead) == (0, 0) if retry else (1, 1)
    if not retry:
        (letter,) = q.dead_letters()
        assert (letter["body"], letter["error"]) == ("slow", "TaskTimeout: too slow")


def test_release_after_a_kill_on_purpose_returns_every_task_with_no_death(
    make_local: Any,
) -> None:
    # Given a consumer killed on purpose, whose task was not found to fail
    q = make_local(max_deliveries=1)
    q.note_task_cost(1e-7)
    q._put_bodies(["a", "b"])
    child, taken = _hanging_consumer(q, max_tasks=10)
    q.killing(child.pid, "no such task")
    _kill(child)
    assert q.fail_running(child.pid, "no such task", lambda env: Failure(env, "x")) is False

    # Then release gives its whole lease back, unsplit and with no death
    assert q.release(child.pid) == 2
    q.attach_consumer()
    lease = q.take(10, timeout=5)
    assert lease is not None and lease.deaths == 0
    assert [e.body for e in lease.envelopes()] == taken == ["a", "b"]
    q.ack(lease)
    c = q.counters()
    assert (c.pending, c.done, c.failed, q.reap()) == (0, 2, 0, 0)


def test_a_consumer_may_hold_several_leases_and_ack_them_in_any_order(
    make_local: Any,
) -> None:
    q = make_local()
    q.attach_consumer()
    for n in range(3):
        q.put(n)
    leases = [take_lease(q) for _ in range(3)]
    assert q.counters().in_flight == 3

    for lease in reversed(leases):
        q.ack(lease)

    c = q.counters()
    assert (c.done, c.in_flight, c.pending) == (3, 0, 0)


def test_sibling_queues_share_one_broker(make_local: Any) -> None:
    a = make_local()
    b = a.sibling("stage-2")
    try:
        a.put("to a")
        b.put("to b")
        a.attach_consumer()
        b.attach_consumer()
        assert take_bodies(a, 1) == ["to a"]
        assert take_bodies(b, 1) == ["to b"]
        assert (a.counters().done, b.counters().done) == (1, 1)
    finally:
        b.dispose()


def _put_then_stop_midway(q: LocalQueue) -> None:
    local_wire.PAUSE_AT = "put"  # the fault hook, armed in this child only
    q.put("torn")


def test_a_producer_killed_mid_put_puts_nothing_and_leaves_the_queue_whole(
    make_local: Any,
) -> None:
    q = make_local()
    child = fork.Process(target=_put_then_stop_midway, args=(q,), daemon=True)
    child.start()
    wait_for(lambda: _state(child.pid) == "T", message="the producer stopped mid-put")
    _kill(child)

    q.put("whole")
    q.attach_consumer()
    assert take_bodies(q, 1) == ["whole"]
    assert q.counters().produced == 1


def _requeue_then_stop_midway(q: LocalQueue, point: str) -> None:
    local_wire.PAUSE_AT = point  # the fault hook, armed in this child only
    q.requeue_dead()


@pytest.mark.parametrize("point", ["requeue", "put"])
def test_a_dead_requeue_killed_midway_loses_nothing(make_local: Any, point: str) -> None:
    # Given one dead letter
    q = make_local()
    q.attach_consumer()
    q.put("letter")
    lease = take_lease(q)
    q.ack(lease, [Failure(env, "E", "tb") for env in lease.envelopes()])
    assert q.counters().dead == 1
    # When a process requeueing it is killed wherever it stops (mid-request,
    # or, were the requeue two steps, between taking the letters and the put)
    child = fork.Process(target=_requeue_then_stop_midway, args=(q, point), daemon=True)
    child.start()
    wait_for(lambda: _state(child.pid) in ("T", "Z", ""), message="the requeue stopped or ended")
    _kill(child)
    # Then the task is a dead letter still, or requeued: never nowhere
    c = q.counters()
    assert (c.dead + c.ready, c.in_flight, c.pending) == (1, 0, c.ready), c
    q.requeue_dead()
    assert take_bodies(q, 1) == ["letter"]
    assert q.join(timeout=5)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return ""
    return data[data.rindex(")") + 2]


# ---------------------------------------------------------------- the temp dir


def test_dispose_in_the_opening_process_stops_the_broker_and_removes_its_dir() -> None:
    q = LocalQueue("unit")
    q.attach_consumer()
    q.put(1)
    lease = take_lease(q)
    q.ack(lease, [Failure(e, "E", "tb") for e in lease.envelopes()])
    assert q.counters().dead == 1
    assert q._broker is not None
    directory = q._broker.dir
    threads = threading.active_count()

    q.dispose()

    assert not os.path.exists(directory)
    assert threading.active_count() == threads - 1


def _dispose_in_child(q: LocalQueue) -> None:
    q.attach_consumer()
    q.dispose()


def test_dispose_in_a_child_process_keeps_the_queue(make_local: Any) -> None:
    q = make_local()
    child = fork.Process(target=_dispose_in_child, args=(q,))
    child.start()
    child.join(10)

    assert child.exitcode == 0
    q.put("still works")
    q.attach_consumer()
    assert take_bodies(q, 1) == ["still works"]


# ---------------------------------------------------------------- idle is new


def _attach_when_told(q: LocalQueue, go: Any, report: Connection) -> None:
    go.wait(10)
    q.attach_consumer()
    lease = q.take(1, timeout=0.5)
    report.send(None if lease is None else lease.sentinel is not None)


def _late_consumer(q: LocalQueue) -> tuple[Any, Any, Connection]:
    go = fork.Event()
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_attach_when_told, args=(q, go, theirs), daemon=True)
    child.start()
    return child, go, mine


def test_a_consumer_forked_during_a_run_that_attaches_after_it_ends_stops(
    make_local: Any,
) -> None:
    # Given a consumer process started while the run is open, slow to attach
    q = make_local()
    child, go, report = _late_consumer(q)
    # When the run ends (closed, nothing pending) before it attaches
    q.close()
    go.set()
    # Then its run is over: it gets its sentinel, as a classic consumer would
    assert report.poll(10) and report.recv() is True
    child.join(10)


def test_a_consumer_forked_while_the_queue_is_idle_waits_for_the_next_run(
    make_local: Any,
) -> None:
    q = make_local()
    q.close()
    assert q.state() == "idle"
    child, go, report = _late_consumer(q)
    go.set()
    assert report.poll(10) and report.recv() is None  # no sentinel: it waits
    child.join(10)


def _attach_then_wait(q: LocalQueue, attached: Any, report: Connection) -> None:
    q.attach_consumer()
    attached.set()
    lease = q.take(1, timeout=10)
    report.send(None if lease is None else lease.sentinel is not None)


def _finish_a_run(q: LocalQueue) -> None:
    """One whole run in this process: a producer puts a task and closes, a
    consumer takes it and acknowledges it; the queue is idle after it."""
    q.attach_producer()
    q.put("x")
    q.detach_producer(close_if_last=True)
    q.attach_consumer()
    lease = take_lease(q)
    q.ack(lease)
    q.detach_consumer()
    assert q.state() == "idle"


@pytest.mark.parametrize("attach", ["before the close", "after the close"])
def test_the_classic_close_stops_a_consumer_forked_after_the_others_finished_the_run(
    make_local: Any, attach: str
) -> None:
    # Given the classic pattern, where the quick consumers finished the whole run
    # (and the last producer closed the queue) before the last consumer was forked
    q = make_local()
    _finish_a_run(q)
    attached = fork.Event()
    mine, theirs = fork.Pipe(duplex=False)
    if attach == "after the close":
        child = fork.Process(target=_attach_when_told, args=(q, attached, theirs), daemon=True)
        child.start()
        # When the user's own queue.close() comes before it attaches
        q.close()
        attached.set()
    else:
        child = fork.Process(target=_attach_then_wait, args=(q, attached, theirs), daemon=True)
        child.start()
        assert attached.wait(10)
        # When the user's own queue.close() comes while it waits
        q.close()
    # Then that close is its stop: it gets its sentinel instead of waiting forever
    assert mine.poll(15) and mine.recv() is True
    child.join(10)
    assert child.exitcode == 0


# ---------------------------------------------------------------- malformed frames

GARBAGE: dict[str, Callable[[str], bytes]] = {
    "garbage bytes": lambda name: b"\x05\x00\x00\x00hello",
    "not a request": lambda name: local_wire.frame("hello"),
    "unknown operation": lambda name: local_wire.frame([99, name]),
    "unknown queue": lambda name: local_wire.frame([10, "no-such-queue"]),  # counters
    "bad ack": lambda name: local_wire.frame([3, name, "lease", 1]),
    "wrong arg shapes": lambda name: local_wire.frame([2, name, "many", "soon"]),  # take
    "outputs for no queue": lambda name: local_wire.frame(
        [3, name, 1, 1, 0, [], [], [], 0, "no-such-queue", [b"x"], [1]]),
}


def _answers(call: Callable[[], Any], within: float = 5.0) -> Any:
    """``call()``'s result, or fail if it has not returned ``within`` seconds (a
    broker that died never answers)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(within)
    assert result, "no answer: the broker is gone"
    return result[0]


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_malformed_frame_drops_only_that_connection(
    make_local: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a client that holds a lease (one death dead-letters a task), and
    # another consumer
    q = make_local(max_deliveries=1)
    q.put_many(["held", "other"])
    bad = copy.copy(q)
    bad.attach_consumer()
    held = take_lease(bad)
    assert [env.body for env in held.envelopes()] == ["held"]
    # When that client's socket sends a malformed frame
    assert bad._sock is not None
    bad._sock.sendall(GARBAGE[kind](q.name))
    # Then the broker closes that connection: the client reads the end of it
    bad._sock.settimeout(5)
    assert bad._sock.recv(64) == b""
    # ... its lease is settled as for a death, and one line says why
    c = _answers(q.counters)
    assert (c.ready, c.in_flight, c.dead, c.failed, c.consumers) == (1, 0, 1, 1, 0)
    assert q.dead_letters()[0]["body"] == "held"
    lines = [r.getMessage() for r in caplog.records if "dropped the connection" in r.getMessage()]
    assert len(lines) == 1 and str(os.getpid()) in lines[0], lines
    # ... and every other client goes on
    good = copy.copy(q)
    good.attach_consumer()
    assert take_bodies(good, 1) == ["other"]
    assert _answers(lambda: q.join(timeout=5))
    bad.dispose()
    good.dispose()


# ---------------------------------------------------------------- producer ids


def test_producers_are_registered_and_detached_by_id(make_local: Any) -> None:
    q = make_local()
    # attach: the id given, or a new one
    mine = q.attach_producer()
    assert isinstance(mine, str) and mine
    assert q.attach_producer("p1") == "p1"
    assert q.counters().producers == 2
    # detach by id; an unknown id detaches nobody, and closes nothing while
    # a producer is left
    q.detach_producer("p1", close_if_last=False)
    q.detach_producer("gone", close_if_last=True)
    c = q.counters()
    assert (c.producers, c.closed) == (1, False)
    # None: the last id this process attached; the last one out closes
    q.detach_producer()
    c = q.counters()
    assert (c.producers, c.closed) == (0, True)
    # with nothing attached, only the close-if-last check: a new run closes
    q.attach_producer("p2")
    q.detach_producer("p2", close_if_last=False)
    assert not q.counters().closed
    q.detach_producer()
    assert q.counters().closed


def _attach_producer_and_hang(q: LocalQueue, report: Connection) -> None:
    report.send(q.attach_producer())
    signal.pause()


def test_a_killed_producer_is_detached_at_once_and_closes_nothing(make_local: Any) -> None:
    q = make_local()
    q.attach_producer("parent")
    mine, theirs = fork.Pipe(duplex=False)
    child = fork.Process(target=_attach_producer_and_hang, args=(q, theirs), daemon=True)
    child.start()
    assert mine.poll(10)
    theirs_id = mine.recv()
    wait_for(lambda: q.counters().producers == 2, message="the child attached")
    _kill(child)
    # the broker saw its connection close: detached by its own id, not the parent's
    wait_for(lambda: q.counters().producers == 1, message="the dead producer detached")
    assert not q.counters().closed
    q.detach_producer(theirs_id)  # the engine's call for it: already gone, a no-op
    assert (q.counters().producers, q.counters().closed) == (1, False)
    q.detach_producer("parent")
    assert q.counters().closed
