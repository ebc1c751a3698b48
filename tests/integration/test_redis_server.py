"""The Redis backend against a real redis-server (started by ``tests/redis_server.py``):
the essentials of the fakeredis unit tests, then what only a real server shows —
a restart in the middle of a job, a password, queues crossing process boundaries.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from helpers import drain, take_lease, wait_for
from redis_server import RedisServer

from pcq.backends.base import Failure
from pcq.backends.redis import RedisQueue
from pcq.errors import BackendUnavailable

Factory = Callable[..., RedisQueue]


@pytest.fixture
def make(redis_url: str) -> Iterator[Factory]:
    """``make(**options)``: a handle on this test's queue (a fresh name) on the
    session's redis-server."""
    name = f"it-{uuid.uuid4().hex[:10]}"
    opened: list[RedisQueue] = []

    def factory(**options: Any) -> RedisQueue:
        queue = RedisQueue(name, url=options.pop("url", redis_url), **options)
        opened.append(queue)
        return queue

    yield factory
    if opened:
        opened[0].purge()
        opened[0].purge_dead()
    for queue in opened:
        queue.dispose()


def bodies(lease: Any) -> list[Any]:
    return [env.body for env in lease.envelopes()]


# ---------------------------------------------------------------- essentials


def test_put_take_ack_in_batches(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(range(3000))

    got: list[int] = []
    while len(got) < 3000:
        lease = take_lease(q)
        got += bodies(lease)
        q.ack(lease)

    assert got == list(range(3000))
    c = q.counters()
    assert (c.produced, c.done, c.pending, c.ready, c.in_flight) == (3000, 3000, 0, 0, 0)


def test_sentinels_stop_batches_and_stale_ones_are_dropped(make: Factory) -> None:
    a, b = make(), make()
    a.attach_consumer()
    b.attach_consumer()
    a.put_many([1, 2])
    a.close()

    lease = a.take(100, timeout=1)
    assert lease is not None and bodies(lease) == [1, 2] and lease.sentinel is not None
    a.ack(lease)
    # b's sentinel is left over; a producer reopens the queue: it is stale now
    a.attach_producer()
    a.put(3)
    lease = take_lease(b)
    assert bodies(lease) == [3] and lease.sentinel is None
    b.ack(lease)
    a.detach_producer()
    assert drain(b) == []


def test_a_dead_consumers_tasks_are_reaped_and_its_late_ack_is_stale(make: Factory) -> None:
    a, b = make(heartbeat_ttl=0.3), make()
    a.attach_consumer()
    b.attach_consumer()
    b.put_many(["x", "y"])
    stale = a.take(2, timeout=1)
    assert stale is not None
    a.dispose()  # stops heartbeating, as a killed process would

    assert wait_for(lambda: b.reap(), timeout=5, message="the reap") == 2
    a.ack(stale)
    assert b.counters().done == 0
    assert drain_n(b, 2) == ["x", "y"]
    c = b.counters()
    assert (c.done, c.pending) == (2, 0)


def drain_n(q: RedisQueue, n: int) -> list[Any]:
    got: list[Any] = []
    while len(got) < n:
        lease = take_lease(q)
        got += bodies(lease)
        q.ack(lease)
    return got


def test_retries_wait_for_their_delay_and_dead_letters_keep_the_reason(
    make: Factory, tmp_path: Any
) -> None:
    q = make()
    q.attach_consumer()
    q.put("flaky")
    lease = take_lease(q)
    (env,) = lease.envelopes()
    acked = time.monotonic()
    q.ack(lease, [Failure(env, "E", "tb", retry_in=0.3)])

    again = take_lease(q)
    assert time.monotonic() - acked >= 0.25
    (env,) = again.envelopes()
    assert env.attempts == 1
    q.ack(again, [Failure(env, "ValueError: no", "Traceback ...")])

    marker = tmp_path / "pwned"
    q._put([b"garbage", pickle.dumps(_CreatesFile(str(marker)))], 0)
    for _ in range(2):
        q.ack(take_lease(q))

    letters = q.dead_letters()
    assert [letter.get("error") for letter in letters[:1]] == ["ValueError: no"]
    assert [letter["raw"][:7] for letter in letters[1:2]] == [b"garbage"]
    assert not marker.exists()
    c = q.counters()
    assert (c.failed, c.dead, c.retried, c.pending) == (1, 3, 1, 0)


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.timeout(30)
def test_a_full_queue_blocks_put_until_a_take(make: Factory) -> None:
    q = make(maxsize=2)
    q.put_many([1, 2])
    producer = make(maxsize=2)
    finished = threading.Event()

    def put_one_more() -> None:
        producer.put(3)
        finished.set()

    thread = threading.Thread(target=put_one_more, daemon=True)
    thread.start()
    assert not finished.wait(0.3)

    q.attach_consumer()
    lease = take_lease(q)
    assert finished.wait(5)
    thread.join(5)
    q.ack(lease)
    assert drain_n(q, 2) == [2, 3]


# ---------------------------------------------------------------- a real server only


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pipelined", [False, True], ids=["take-then-ack", "ack_and_take"])
def test_a_server_restart_mid_job_loses_nothing(redis_server: RedisServer, pipelined: bool) -> None:
    # Given a producer and a consumer thread working through 4000 tasks
    name, n = f"restart-{uuid.uuid4().hex[:8]}", 4000
    producer = RedisQueue(name, url=redis_server.url, maxsize=500, retry_for=60)
    consumer = RedisQueue(name, url=redis_server.url, retry_for=60)
    consumer.attach_consumer()
    producer.attach_producer()
    handled: list[int] = []
    errors: list[BaseException] = []

    def consume() -> None:
        # As Consumer.consume does: acknowledge each lease together with the next
        # take (pipelined) or apart.  After the restart the server has forgotten
        # the scripts, so ack_and_take also meets NOSCRIPT.
        try:
            lease = None
            while True:
                if lease is None:
                    lease = consumer.take(16, timeout=1)
                    if lease is None:
                        continue
                handled.extend(bodies(lease))
                time.sleep(0.005)  # some work, so the job spans the restart
                if lease.sentinel is not None:
                    consumer.ack(lease)
                    return
                if pipelined:
                    lease = consumer.ack_and_take(lease, max_tasks=16, timeout=1)
                else:
                    consumer.ack(lease)
                    lease = None
        except BaseException as exc:
            errors.append(exc)

    def produce() -> None:
        try:
            producer.put_many(range(n))
            producer.detach_producer()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f, daemon=True) for f in (consume, produce)]
    for thread in threads:
        thread.start()

    # When the server restarts (a clean shutdown; the append-only file keeps the data)
    wait_for(lambda: len(handled) >= n // 3, timeout=30, message="a third of the job")
    redis_server.restart()
    assert len(handled) < n, "the job ended before the restart: make it longer"

    # Then both finish, every task was handled, and the books balance
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    assert set(Counter(handled)) == set(range(n))
    c = producer.counters()
    assert c.pending == 0 and c.done == c.produced >= n
    producer.dispose()
    consumer.dispose()


def test_ack_and_take_whose_connection_dies_after_both_scripts_acks_once(
    make: Factory, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task put twice (a put repeated after a lost reply: two equal
    # messages), two more tasks, and a consumer holding the first copy
    q = make()
    q.attach_consumer()
    q.put("warm-up")  # loads the scripts
    warm = take_lease(q)
    assert q.ack_and_take(warm, timeout=0) is None
    admin = redis.Redis.from_url(redis_url)
    q._put_bodies(["dup"])
    raw = admin.lindex(q.keys.ready, 0)
    assert isinstance(raw, bytes)
    q._put([raw], 1)
    q.put_many(["x", "y"])
    lease = q.take(1, timeout=1)
    assert lease is not None and lease.receipt.messages == [raw]
    (env,) = lease.envelopes()
    assert q._consumer_id is not None
    inflight = q.keys.inflight(q._consumer_id)

    # When the connection breaks once the server has run both scripts, before the
    # consumer read their replies (ack_and_take sends both again on a new one)
    real = redis.connection.AbstractConnection.send_packed_command
    shas = [q._link.script(name).sha.encode() for name in ("ack", "take")]
    broken = []

    def send(conn: Any, command: Any, check_health: bool = True) -> None:
        real(conn, command, check_health)
        data = command if isinstance(command, bytes) else b"".join(command)
        if not broken and all(sha in data for sha in shas):
            wait_for(lambda: admin.llen(inflight) == 3, message="both scripts to run")
            conn.disconnect()  # the replies, sent or not, never arrive
            broken.append(conn)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)
    failures = [Failure(env, "E", "tb", retry_in=1.0)]  # not due before the resend
    after = q.ack_and_take(lease, failures, max_tasks=10, timeout=5)
    monkeypatch.undo()

    # Then the failure was acknowledged once — the repeated ack did not take the
    # copy for its own lease — and the lost take's tasks are the next lease
    assert len(broken) == 1
    assert after is not None and after.receipt.messages[0] == raw
    assert bodies(after) == ["dup", "x", "y"]
    c = q.counters()
    assert (c.pending, c.in_flight, c.delayed, c.retried, c.done) == (4, 3, 1, 1, 1)
    q.ack(after)
    retry = take_lease(q)
    assert [(e.body, e.attempts) for e in retry.envelopes()] == [("dup", 1)]
    q.ack(retry)
    c = q.counters()
    assert (c.pending, c.in_flight, c.delayed, c.ready, c.done) == (0, 0, 0, 0, 5)
    admin.close()


def test_a_wrong_password_is_backend_unavailable() -> None:
    server = RedisServer(password="right-one").start()
    try:
        for url in (
            f"redis://:wrong-one@127.0.0.1:{server.port}/0",
            f"redis://127.0.0.1:{server.port}/0",
        ):
            q = RedisQueue("x", url=url)
            with pytest.raises(BackendUnavailable, match="refused") as caught:
                q.counters()
            assert "wrong-one" not in str(caught.value)
        assert RedisQueue("x", url=server.url).counters().pending == 0
    finally:
        server.cleanup()


def _put_in_child(queue: RedisQueue, n: int) -> None:
    queue.attach_producer()
    queue.put_many(range(n))
    queue.detach_producer()
    queue.dispose()


def test_a_queue_handed_to_a_spawned_process_reconnects_there(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    child = mp.get_context("spawn").Process(target=_put_in_child, args=(q, 100))
    child.start()
    child.join(60)

    assert child.exitcode == 0
    assert drain(q) == list(range(100))


def _consume_in_child(queue: RedisQueue, took: Any, hold: bool) -> None:
    queue.attach_consumer()
    if hold:  # take a lease and hang on to it until killed
        lease = queue.take(10, timeout=10)
        took.set()
        assert lease is not None
        time.sleep(60)
    drain(queue, timeout=30)
    queue.detach_consumer()
    queue.dispose()


@pytest.mark.timeout(60)
def test_forked_consumers_finish_a_job_and_a_killed_ones_tasks_are_evicted(
    make: Factory,
) -> None:
    # Given a parent that is connected (and a producer) before it forks consumers
    q = make()
    q.attach_producer()
    q.put_many(range(200))
    ctx = mp.get_context("fork")
    took = ctx.Event()
    doomed = ctx.Process(target=_consume_in_child, args=(q, took, True))
    doomed.start()
    assert took.wait(20)

    # When one consumer is SIGKILLed holding a lease and its supervisor evicts it
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(10)
    assert q.evict(doomed.pid) == 10

    # Then a fresh consumer finishes the job, and the queue closes when the producer detaches
    worker = ctx.Process(target=_consume_in_child, args=(q, took, False))
    worker.start()
    q.detach_producer()
    worker.join(30)
    assert worker.exitcode == 0
    c = q.counters()
    assert (c.pending, c.done, c.in_flight, c.consumers) == (0, 200, 0, 0)


def test_a_unix_socket_url_works(tmp_path: Any) -> None:
    path = tmp_path / "redis.sock"
    server = RedisServer(extra=("--unixsocket", str(path), "--unixsocketperm", "700")).start()
    try:
        q = RedisQueue("unix", url=f"unix://{path}?db=2")
        q.attach_consumer()
        q.put_many(["over", "a", "socket"])
        q.close()
        assert drain(q) == ["over", "a", "socket"]
        assert server.client().dbsize() == 0  # db 2, not db 0
        q.detach_consumer()
        q.dispose()
    finally:
        server.cleanup()
