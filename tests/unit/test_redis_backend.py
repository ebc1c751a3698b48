"""The Redis backend against fakeredis (in-process, with Lua): the protocols of
put, take, ack, close, reap and backpressure, lost replies and bad input.

The same essentials run against a real redis-server in
``tests/integration/test_redis_server.py``.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from fake_redis import FakeRedis
from helpers import drain, take_lease, wait_for
from redis_server import free_port

from pcq.backends import open_queue
from pcq.backends import redis as redis_backend
from pcq.backends.base import Counters, Failure, Lease
from pcq.backends.redis import RedisQueue, key
from pcq.backends.redis_keys import SCRIPTS
from pcq.backends.redis_link import Link, load_script, safe_url
from pcq.envelope import Sentinel
from pcq.errors import BackendLost, BackendUnavailable, ConfigError

Factory = Callable[..., RedisQueue]


@pytest.fixture
def client() -> FakeRedis:
    return FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def make(client: FakeRedis) -> Iterator[Factory]:
    """``make(**options)``: a queue object on the test's queue; every call is
    another handle (another consumer or producer) on the same queue."""
    opened: list[RedisQueue] = []

    def factory(**options: Any) -> RedisQueue:
        queue = RedisQueue("unit", client=client, **options)
        opened.append(queue)
        return queue

    yield factory
    for queue in opened:
        queue.dispose()


def bodies(lease: Any) -> list[Any]:
    return [env.body for env in lease.envelopes()]


def lose_replies(queue: RedisQueue, script: str, times: int = 1) -> None:
    """The next ``times`` runs of ``script`` happen, but their reply is lost."""
    link = queue._link
    real = link.script
    left = [times]

    def script_for(name: str) -> Any:
        run = real(name)
        if name != script:
            return run

        def flaky(**kwargs: Any) -> Any:
            result = run(**kwargs)
            if left[0] > 0:
                left[0] -= 1
                raise redis.exceptions.ConnectionError("reply lost")
            return result

        return flaky

    link.script = script_for  # type: ignore[method-assign]
    real_pipelined = link.pipelined

    def pipelined(client: Any, calls: Any) -> Any:
        link.script = real  # type: ignore[method-assign]
        try:
            result = real_pipelined(client, calls)
        finally:
            link.script = script_for  # type: ignore[method-assign]
        if left[0] > 0 and any(name == script for name, _, _ in calls):
            left[0] -= 1
            raise redis.exceptions.ConnectionError("reply lost")
        return result

    link.pipelined = pipelined  # type: ignore[method-assign]


# ---------------------------------------------------------------- put, take, ack


def test_put_take_ack_counts_every_task_once(make: Factory) -> None:
    # Given a consumer and five tasks
    q = make()
    q.attach_consumer()
    assert q.put_many(range(5)) == 5
    c = q.counters()
    assert (c.ready, c.pending, c.produced) == (5, 5, 5)

    # When it takes three and acknowledges them
    lease = q.take(3, timeout=1)
    assert lease is not None and bodies(lease) == [0, 1, 2]
    assert q.counters().in_flight == 3
    q.ack(lease)

    # Then they are done and the other two are still ready, in order
    c = q.counters()
    assert (c.ready, c.in_flight, c.pending, c.done) == (2, 0, 2, 3)
    lease = q.take(10, timeout=1)
    assert lease is not None and bodies(lease) == [3, 4]
    q.ack(lease)
    assert q.counters().pending == 0


def test_a_large_put_is_pipelined_in_chunks_and_keeps_its_order(make: Factory) -> None:
    q = make()
    q.attach_consumer()

    q._put_bodies(list(range(2500)))  # more than one put script call

    assert q.counters().pending == 2500
    got: list[int] = []
    while len(got) < 2500:
        lease = q.take(512, timeout=5)  # big leases: the order is what is checked
        assert lease is not None
        got += bodies(lease)
        q.ack(lease)
    assert got == list(range(2500))


def reaped_lease(make: Factory) -> tuple[RedisQueue, RedisQueue, Lease, Counters]:
    """Consumer A took a task and stopped heartbeating (as if frozen or dead);
    consumer B reaped the task.  Returns A, B, A's stale lease, B's counters."""
    a, b = make(heartbeat_ttl=0.2), make()
    a.attach_consumer()
    b.attach_consumer()
    a.put("task")
    stale = take_lease(a)
    a.dispose()  # its heartbeat stops
    wait_for(lambda: b.reap() == 1, timeout=5, message="the reap of A's task")
    return a, b, stale, b.counters()


def test_a_stale_ack_changes_nothing(make: Factory) -> None:
    # Given consumer A whose lease was reaped after it stopped heartbeating
    a, b, stale, before = reaped_lease(make)

    # When A acknowledges it late
    (env,) = stale.envelopes()
    a.ack(stale, [Failure(env, "E", "tb")])

    # Then no counter moved and nothing was written: the task is B's to finish
    assert b.counters() == before
    assert a.stale_leases == 1  # and A knows: its own summary does not count it
    assert b.dead_letters() == []
    fresh = take_lease(b)
    assert [e.id for e in fresh.envelopes()] == [env.id]
    b.ack(fresh)
    c = b.counters()
    assert (c.done, c.failed, c.pending) == (1, 0, 0)


def test_leases_acknowledged_out_of_order_both_count(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(range(4))
    first = q.take(2, timeout=1)
    second = q.take(2, timeout=1)
    assert first is not None and second is not None

    q.ack(second)  # not the oldest lease: ack.lua finds it by scanning
    q.ack(first)

    c = q.counters()
    assert (c.done, c.pending, c.in_flight) == (4, 0, 0)


def test_given_back_tasks_are_taken_next(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(["a", "b", "c", "d"])
    lease = q.take(3, timeout=1)
    assert lease is not None
    envs = list(lease.envelopes())

    q.ack(lease, give_back=envs[1:])  # "a" done, "b" and "c" not started

    c = q.counters()
    assert (c.done, c.pending, c.ready) == (1, 3, 3)
    again = q.take(10, timeout=1)
    assert again is not None and bodies(again) == ["b", "c", "d"]
    q.ack(again)


# ---------------------------------------------------------------- sentinels


def test_a_sentinel_ends_a_batch_and_the_next_consumer_gets_its_own(make: Factory) -> None:
    # Given two consumers and two tasks, then close: ready = [S, S, 1, 0]
    a, b = make(), make()
    a.attach_consumer()
    b.attach_consumer()
    a.put_many([0, 1])
    a.close()

    # When A asks for many
    lease = a.take(100, timeout=1)

    # Then it gets the tasks and one sentinel, no more; B gets the other
    assert lease is not None and bodies(lease) == [0, 1] and lease.sentinel is not None
    a.ack(lease)
    other = b.take(100, timeout=1)
    assert other is not None and other.size == 0 and other.sentinel is not None
    b.ack(other)
    assert a.counters().ready == 0


def test_a_sentinel_of_an_earlier_epoch_is_dropped(make: Factory, client: FakeRedis) -> None:
    # Given a closed queue with a sentinel in it (in the list, not counted ready)
    q = make()
    q.attach_consumer()
    q.close()
    assert (client.llen(q.keys.ready), q.counters().ready) == (1, 0)

    # When a producer reopens it and puts a task
    q.attach_producer()
    q.put("new")

    # Then the old sentinel is dropped server-side, never returned
    lease = q.take(10, timeout=1)
    assert lease is not None and bodies(lease) == ["new"] and lease.sentinel is None
    q.ack(lease)
    assert q.counters().ready == 0
    assert not q._sentinel_is_current(Sentinel(0)) and q._sentinel_is_current(Sentinel(1))


def test_close_counts_live_consumers_only_and_is_idempotent(
    make: Factory, client: FakeRedis
) -> None:
    # Given two live consumers and one whose heartbeat expired
    live = [make(), make()]
    for q in live:
        q.attach_consumer()
    gone = make(heartbeat_ttl=0.2)
    gone.attach_consumer()
    gone.dispose()
    wait_for(lambda: live[0].counters().consumers == 2, timeout=5, message="the expiry")

    # When the queue is closed, twice
    live[0].close()
    live[1].close()

    # Then there are two sentinels, one per live consumer (sentinels are not ready tasks)
    c = live[0].counters()
    assert c.closed and client.llen(live[0].keys.ready) == 2 and c.ready == 0


def test_ready_counts_tasks_not_the_sentinels_behind_them(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(range(70))
    q.close()

    c = q.counters()
    assert (c.ready, c.pending, c.closed) == (70, 70, True)


def test_a_burst_consumer_started_on_an_idle_queue_stops(make: Factory) -> None:
    q = make()
    q.close()
    q.join_run(burst=True)

    lease = q.take(1, timeout=None)

    assert lease is not None and lease.sentinel is not None and lease.size == 0
    q.ack(lease)


def test_a_consumer_started_on_an_idle_queue_waits_for_the_next_run(make: Factory) -> None:
    # Given a finished run: closed, nothing pending
    q, producer = make(), make()
    q.close()
    assert q.state() == "idle"
    serves = q.join_run()

    # Then a consumer that attaches waits ...
    assert q.take(1, timeout=0.3) is None
    # ... and serves the next run, to its sentinel
    producer.attach_producer()
    assert q.state() == "open"
    producer.put("next")
    producer.detach_producer()
    assert drain(q) == ["next"]
    assert serves == 1  # the run after the finished one (epoch 0)


def test_a_replacement_for_a_finished_run_stops(make: Factory) -> None:
    q = make()
    q.close()  # run 0 finished while its consumer was being replaced
    q.join_run(run=0)
    lease = q.take(1, timeout=1)
    assert lease is not None and lease.sentinel is not None


def test_a_burst_consumer_stops_when_no_producer_is_attached(make: Factory) -> None:
    q, producer = make(), make()
    q.join_run(burst=True)
    producer.attach_producer()
    assert q.take(1, timeout=0.3) is None  # a producer is attached: it waits
    producer.detach_producer(close_if_last=False)
    lease = q.take(1, timeout=1)
    assert lease is not None and lease.sentinel is not None


def test_the_last_sentinel_waits_for_delayed_retries(make: Factory) -> None:
    # Given one consumer, one task, closed: ready = [S, task]
    q = make()
    q.attach_consumer()
    q.put("flaky")
    q.close()
    lease = q.take(1, timeout=1)
    assert lease is not None
    (env,) = lease.envelopes()

    # When the task fails and is retried later
    q.ack(lease, [Failure(env, "E", "tb", retry_in=0.3)])

    # Then the consumer does not stop yet: the retry comes before its sentinel
    assert q.take(10, timeout=0) is None
    assert drain(q) == ["flaky"]
    assert q.counters().pending == 0


def test_the_last_producer_to_detach_closes_and_a_dead_one_does_not_count(
    make: Factory,
) -> None:
    # Given two live producers and one whose heartbeat expired
    a, b = make(), make()
    a.attach_producer()
    b.attach_producer()
    dead = make(heartbeat_ttl=0.2)
    dead.attach_producer()
    dead.dispose()
    wait_for(lambda: a.counters().producers == 2, timeout=5, message="the expiry")

    # When one detaches the queue stays open; when the other does, it closes
    a.detach_producer()
    assert not a.counters().closed
    b.detach_producer()
    c = a.counters()
    assert (c.closed, c.producers) == (True, 0)


# ---------------------------------------------------------------- reap and evict


def test_reap_returns_a_dead_consumers_tasks_to_the_front(make: Factory) -> None:
    # Given consumer A holding two tasks, and two more tasks waiting
    a, b = make(heartbeat_ttl=0.2), make()
    a.attach_consumer()
    b.attach_consumer()
    b.put_many(["a1", "a2", "w1", "w2"])
    held = a.take(2, timeout=1)
    assert held is not None and bodies(held) == ["a1", "a2"]

    # When A stops heartbeating and B reaps
    a.dispose()
    moved = wait_for(lambda: b.reap(), timeout=5, message="the reap")

    # Then A's tasks are back, ahead of the others, each alone (suspects), and A
    # is unregistered
    assert moved == 2
    taken = []
    for _ in range(3):
        lease = b.take(10, timeout=1)
        assert lease is not None
        taken.append((bodies(lease), lease.deaths))
        b.ack(lease)
    assert taken == [(["a1"], 1), (["a2"], 1), (["w1", "w2"], 0)]
    c = b.counters()
    assert (c.consumers, c.done, c.pending) == (1, 4, 0)
    assert b._link.call(lambda r: r.exists(b.keys.deaths)) == 0  # forgotten once handled


def test_evict_returns_a_killed_workers_tasks_at_once(make: Factory) -> None:
    worker, supervisor = make(), make()
    worker.attach_consumer()  # its id is "host:pid:..." of this process
    supervisor.put_many([1, 2])
    held = worker.take(2, timeout=1)
    assert held is not None

    assert supervisor.evict(os.getpid()) == 2
    assert supervisor.evict(os.getpid(), host="another-host") == 0

    c = supervisor.counters()
    assert (c.ready, c.in_flight, c.consumers, c.pending) == (2, 0, 0, 2)


def test_detach_gives_back_what_was_in_flight(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many([1, 2, 3])
    assert q.take(2, timeout=1) is not None

    q.detach_consumer()

    c = q.counters()
    assert (c.ready, c.in_flight, c.consumers) == (3, 0, 0)


# ---------------------------------------------------------------- retries, dead letters


def test_a_retry_comes_back_when_due_with_one_more_attempt(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put({"n": 1})
    lease = take_lease(q)
    (env,) = lease.envelopes()
    acked = time.monotonic()

    q.ack(lease, [Failure(env, "E", "tb", retry_in=0.3)])

    c = q.counters()
    assert (c.delayed, c.retried, c.pending, c.ready) == (1, 1, 1, 0)
    assert q.take(1, timeout=0) is None
    again = take_lease(q)
    assert time.monotonic() - acked >= 0.25
    assert [(e.id, e.body, e.attempts) for e in again.envelopes()] == [(env.id, {"n": 1}, 1)]
    q.ack(again)
    assert q.counters().pending == 0


def test_equal_retries_stay_two_tasks(make: Factory, client: FakeRedis) -> None:
    # A put whose reply was lost can leave a task twice; both copies are pending,
    # so both must come back from the delayed set even if their bytes are equal.
    q = make()
    q.attach_consumer()
    q._put_bodies(["dup"])
    raw = client.lindex(q.keys.ready, 0)
    assert isinstance(raw, bytes)
    q._put([raw], 1)
    lease = q.take(2, timeout=1)
    assert lease is not None and lease.size == 2

    q.ack(lease, [Failure(env, "E", "", retry_in=0) for env in lease.envelopes()])

    assert q.counters().delayed == 2
    again = q.take(10, timeout=1)
    assert again is not None and again.size == 2
    q.ack(again)
    assert q.counters().pending == 0


def test_garbage_bytes_are_dead_lettered_and_not_counted(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q._put([b"\xc1 not msgpack"], 0)

    lease = take_lease(q)
    assert lease.batches == [] and len(lease.bad) == 1
    q.ack(lease)

    (letter,) = q.dead_letters()
    assert letter["raw"] == b"\xc1 not msgpack" and "not msgpack" in letter["error"]
    c = q.counters()
    assert (c.dead, c.failed, c.pending, c.in_flight) == (1, 0, 0, 0)


class _CreatesFile:
    """A pickle whose loading would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_a_pickle_payload_is_dead_lettered_never_run(make: Factory, tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    q = make()
    q.attach_consumer()
    q._put([payload], 0)

    lease = take_lease(q)
    q.ack(lease)

    (letter,) = q.dead_letters()
    assert letter["raw"] == payload
    assert not marker.exists()


def test_dead_tasks_are_requeued_pending_again_and_garbage_stays(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put("dies")
    q._put([b"\xc1"], 0)
    for _ in range(2):
        lease = take_lease(q)
        q.ack(lease, [Failure(env, "E", "tb") for env in lease.envelopes()])
    c = q.counters()
    assert (c.dead, c.failed, c.pending) == (2, 1, 0)

    assert q.requeue_dead() == 1

    c = q.counters()
    assert (c.dead, c.failed, c.pending, c.ready) == (1, 0, 1, 1)
    lease = take_lease(q)
    assert [(e.body, e.attempts) for e in lease.envelopes()] == [("dies", 0)]
    q.ack(lease)
    assert q.purge_dead() == 1 and q.counters().dead == 0


def test_requeued_tasks_come_before_the_sentinels_of_a_closed_queue(make: Factory) -> None:
    # Given a job that ended (closed) with a dead letter, its consumer still attached
    q = make()
    q.attach_consumer()
    q.put("dies")
    lease = take_lease(q)
    q.ack(lease, [Failure(env, "E", "tb") for env in lease.envelopes()])
    q.close()

    # When the dead letter is requeued
    assert q.requeue_dead() == 1

    # Then the queue stays closed and the consumer handles the task, then stops
    assert q.counters().closed
    assert drain(q) == ["dies"]
    assert q.counters().pending == 0


def test_purge_drops_everything_and_keeps_the_run_closed(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(range(3))
    held = q.take(1, timeout=1)
    assert held is not None
    q.close()

    assert q.purge() == 3  # two ready, one in flight; the sentinel is no task

    c = q.counters()
    assert (c.ready, c.in_flight, c.pending, c.produced, c.closed) == (0, 0, 0, 0, True)
    q.ack(held)  # stale now: changes nothing
    assert q.counters().done == 0


# ---------------------------------------------------------------- backpressure


@pytest.mark.timeout(30)
def test_a_full_queue_blocks_put_without_polling(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a full queue (maxsize 2) and a producer with one more task
    monkeypatch.setattr("pcq.backends.redis.SPACE_WAIT", 5.0)  # only a token wakes it early
    q = make(maxsize=2)
    q.put_many([1, 2])
    producer = make(maxsize=2)
    calls: list[str] = []
    run = producer._link.run

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return run(name, *args, **kwargs)

    producer._link.run = counting  # type: ignore[method-assign]
    finished = threading.Event()

    def put_one_more() -> None:
        producer.put(3)
        finished.set()

    thread = threading.Thread(target=put_one_more, daemon=True)

    # When it puts, it waits, asking the server once, not in a loop
    thread.start()
    assert not finished.wait(0.5)
    assert calls == ["put"]
    assert q.counters().ready == 2

    # Then one take wakes it at once
    q.attach_consumer()
    lease = q.take(1, timeout=1)
    assert lease is not None
    assert finished.wait(2), "the put was not woken by the take"
    thread.join(5)
    q.ack(lease)
    assert [bodies(take_lease(q)) for _ in range(2)] == [[2], [3]]


def test_a_bounded_put_pushes_what_fits_then_waits(make: Factory) -> None:
    q = make(maxsize=3)
    q.attach_consumer()
    done = threading.Event()

    def put_ten() -> None:
        q.put_many(range(10))
        done.set()

    thread = threading.Thread(target=put_ten, daemon=True)
    thread.start()
    wait_for(lambda: q.counters().ready == 3, timeout=5)
    assert not done.is_set()

    got: list[int] = []
    while len(got) < 10:
        assert q.counters().ready <= 3
        lease = take_lease(q)
        got += bodies(lease)
        q.ack(lease)
    assert done.wait(5) and got == list(range(10))


# ---------------------------------------------------------------- lost replies


def test_a_take_whose_reply_was_lost_strands_nothing(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(range(3))
    lose_replies(q, "take")

    lease = q.take(10, timeout=1)  # ran twice: the second adopts what the first moved

    assert lease is not None and bodies(lease) == [0, 1, 2]
    assert q.counters().in_flight == 3
    q.ack(lease)
    c = q.counters()
    assert (c.done, c.pending, c.in_flight) == (3, 0, 0)


def test_a_message_moved_by_a_lost_blmove_is_adopted(make: Factory, client: FakeRedis) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(["x", "y"])
    me = q._consumer_id
    assert me is not None
    client.lmove(q.keys.ready, q.keys.inflight(me), "RIGHT", "LEFT")  # reply never seen

    lease = q.take(10, timeout=1)

    assert lease is not None and bodies(lease) == ["x", "y"]
    q.ack(lease)
    assert q.counters().pending == 0


def test_an_ack_whose_reply_was_lost_counts_once(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(range(3))
    lease = q.take(3, timeout=1)
    assert lease is not None
    lose_replies(q, "ack")

    q.ack(lease)

    c = q.counters()
    assert (c.done, c.pending, c.in_flight) == (3, 0, 0)


def test_a_put_whose_reply_was_lost_counts_once(make: Factory) -> None:
    q = make()
    lose_replies(q, "put")
    q.counters()  # connect first: a lost reply on first contact is a plain failure

    q.put("once")

    c = q.counters()
    assert c.pending == c.ready == c.produced == 1  # the resend found its batch id


# ---------------------------------------------------------------- errors, URLs, processes


def test_an_unreachable_server_is_one_clear_line_without_the_password() -> None:
    port = free_port()
    q = RedisQueue("x", url=f"redis://:hunter2@127.0.0.1:{port}/0")

    with pytest.raises(BackendUnavailable) as caught:
        q.counters()

    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "hunter2" not in message
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)


@pytest.mark.parametrize(
    "url", ["redis://localhost:notaport/0", "http://localhost:6379/0", "redis://localhost/x"]
)
def test_a_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="bad Redis URL"):
        RedisQueue("x", url=url)
    with pytest.raises(ConfigError):
        open_queue("redis", url=url)


def test_bad_names_and_options_are_config_errors(client: FakeRedis) -> None:
    for name in ("", "a{}b", "{a", "a}", "}a{", "{a}{b}"):
        with pytest.raises(ConfigError):
            RedisQueue(name, client=client)
    # One hash tag is a name of its own: the queues of a pipeline share a slot.
    assert RedisQueue("{crawl}.parse", client=client).keys.ready == "pcq:{crawl}.parse:ready"
    with pytest.raises(ConfigError):
        RedisQueue("x", client=client, heartbeat_ttl=0)
    with pytest.raises(ConfigError, match="decode_responses"):
        RedisQueue("x", client=fakeredis.FakeRedis(decode_responses=True))


def test_safe_url_hides_only_the_password() -> None:
    assert safe_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert safe_url("rediss://:pw@h/0") == "rediss://:***@h/0"
    assert safe_url("unix:///tmp/r.sock?db=1") == "unix:///tmp/r.sock?db=1"


def test_a_dropped_connection_is_retried_with_backoff(client: FakeRedis) -> None:
    link = Link("redis://unused", client, retry_for=5)
    link.client()  # connected once: later failures are outages, not bad config
    failures = [2]

    def op(c: redis.Redis) -> str:
        if failures[0]:
            failures[0] -= 1
            raise redis.exceptions.ConnectionError("server restarting")
        return "ok"

    started = time.monotonic()
    assert link.call(op) == "ok"
    assert 0.1 <= time.monotonic() - started < 2  # 0.05 + 0.1 s of backoff


def test_an_outage_longer_than_retry_for_is_backend_unavailable(client: FakeRedis) -> None:
    link = Link("redis://unused", client, retry_for=0.3)
    link.client()

    def op(c: redis.Redis) -> None:
        raise redis.exceptions.TimeoutError("no answer")

    with pytest.raises(BackendUnavailable, match=r"retried 0\.3 s"):
        link.call(op)


def test_a_refusal_is_not_retried(client: FakeRedis) -> None:
    link = Link("redis://unused", client, retry_for=30)
    link.client()
    calls = []

    def op(c: redis.Redis) -> None:
        calls.append(1)
        raise redis.exceptions.AuthenticationError("WRONGPASS invalid password")

    with pytest.raises(BackendUnavailable, match="refused"):
        link.call(op)
    assert calls == [1]


def test_a_queue_pickles_as_plain_config(make: Factory) -> None:
    # Given a queue with a consumer, a producer and a heartbeat thread running
    q = make(maxsize=7, heartbeat_ttl=3.0)
    q.attach_consumer()
    q.attach_producer()

    # When it crosses a pickle boundary
    copy = pickle.loads(pickle.dumps(q))

    # Then the copy holds its configuration and no connection or thread, and it
    # starts unattached; producer registrations travel along (for detach)
    assert (copy.name, copy.maxsize, copy.url, copy.heartbeat_ttl) == ("unit", 7, q.url, 3.0)
    assert copy._link._client is None and copy._heartbeat is None
    assert copy._consumer_id is None and copy._producer_ids == q._producer_ids
    with pytest.raises(RuntimeError, match="attach_consumer"):
        copy.take(1, timeout=0)


def test_every_key_of_a_queue_shares_one_hash_tag(make: Factory) -> None:
    q = make()
    assert key("jobs", "ready") == "pcq:{jobs}:ready"
    names = [*q.keys.every(), q.keys.inflight_prefix]
    assert all(name.startswith("pcq:{unit}:") for name in names)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_scripts_keys_are_the_ones_its_lua_header_lists(script: str) -> None:
    # The KEYS a script is called with come from SCRIPTS alone; its .lua file's
    # header comment says what it expects: the two must name the same keys in
    # the same order, with the queue's marker last.
    header = []
    for line in load_script(script).splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    text = "\n".join(header)
    listed = [(int(n), part) for n, part in re.findall(r"KEYS\[(\d+)\]\s+(\S+)", text)]
    assert [n for n, _ in listed] == list(range(1, len(listed) + 1)), text
    assert tuple(part for _, part in listed) == SCRIPTS[script]
    assert "KEYS[#KEYS] marker" in text
    assert "redis.call('EXISTS', KEYS[#KEYS]) == 0" in load_script(script)


def test_every_lua_file_is_in_the_scripts_table() -> None:
    files = {p.stem for p in Path(redis_backend.__file__).parent.glob("*.lua")}
    assert files == set(SCRIPTS)


def test_registrations_list_the_live_consumers_and_producers(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.attach_producer()
    gone = make(heartbeat_ttl=0.2)
    gone.attach_consumer()
    gone.dispose()
    wait_for(lambda: len(q.registrations()) == 2, timeout=5, message="the expiry")

    regs = sorted(q.registrations(), key=lambda r: r["role"])

    assert [r["role"] for r in regs] == ["consumer", "producer"]
    assert all(r["id"].startswith(f"{r['host']}:{os.getpid()}:") for r in regs)
    assert all(abs(time.time() - r["heartbeat"]) < 5 for r in regs)


# ---------------------------------------------------------------- ack_and_take


class Wire:
    """Every write the clients make to the server: one entry a round trip (a
    pipeline is one write), listing its commands, an EVALSHA by script name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, queue: RedisQueue) -> None:
        self.writes: list[list[str]] = []
        scripts = ("ack", "take", "put", "reap", "heartbeat", "counters", "close", "attach")
        self._names = {queue._link.script(name).sha.encode(): name for name in scripts}
        real = redis.connection.AbstractConnection.send_packed_command

        def send(conn: Any, command: Any, check_health: bool = True) -> None:
            data = command if isinstance(command, bytes) else b"".join(command)
            self.writes.append(self._commands(data))
            real(conn, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", send)

    def _commands(self, data: bytes) -> list[str]:
        found, at = [], 0

        def line() -> int:
            nonlocal at
            end = data.index(b"\r\n", at)
            value, at = int(data[at + 1 : end]), end + 2
            return value

        while at < len(data):
            words = []
            for _ in range(line()):  # RESP: *count, then $size + bytes per word
                size = line()
                words.append(data[at : at + size])
                at += size + 2
            name = words[0].decode().upper()
            found.append(f"EVALSHA {self._names.get(words[1], '?')}" if name == "EVALSHA" else name)
        return found


def lose_pipeline_reply(monkeypatch: pytest.MonkeyPatch, run: int | None = None) -> None:
    """The next pipeline reaches the server — only its first ``run`` commands if
    given, as if the connection broke in between — but its reply is lost."""
    real = redis.client.Pipeline.execute
    armed = [True]

    def execute(pipe: redis.client.Pipeline, raise_on_error: bool = True) -> list[Any]:
        if not armed[0]:
            return real(pipe, raise_on_error)
        armed[0] = False
        if run is not None:
            del pipe.command_stack[run:]
        if pipe.command_stack:
            real(pipe, raise_on_error)
        raise redis.exceptions.ConnectionError("reply lost")

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)


def warm(q: RedisQueue) -> None:
    """One put, take and ack_and_take, so the server has every script loaded."""
    q.put("warm-up")
    lease = take_lease(q)
    assert q.ack_and_take(lease, timeout=0) is None


def test_ack_and_take_is_one_round_trip_while_tasks_are_ready(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer with a lease and more tasks ready (no heartbeat meanwhile),
    # all put as one message (a consumer reported cheap tasks)
    q = make(heartbeat_ttl=60)
    q.attach_consumer()
    q.note_task_cost(1e-6)
    warm(q)
    q.put_many(range(6))
    assert q.counters().ready == 6 and q._link.call(lambda r: r.llen(q.keys.ready)) < 6
    lease = q.take(2, timeout=1)
    assert lease is not None and bodies(lease) == [0, 1]
    wire = Wire(monkeypatch, q)

    # When it acknowledges the lease and takes the next
    after = q.ack_and_take(lease, max_tasks=3, timeout=1)

    # Then both went out in one write, the lease is done and the next is in flight
    assert wire.writes == [["EVALSHA ack", "EVALSHA take"]]
    assert after is not None and bodies(after) == [2, 3, 4]
    assert len(after.batches) == 1  # cut from one message: one batch, not one per task
    c = q.counters()
    assert (c.done, c.in_flight, c.ready, c.pending) == (3, 3, 1, 4)


def test_ack_and_take_waits_when_nothing_is_ready(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put("first")
    lease = take_lease(q)

    # Nothing ready: it waits for the timeout, the ack applied all the same
    started = time.monotonic()
    assert q.ack_and_take(lease, timeout=0.3) is None
    assert time.monotonic() - started >= 0.25
    assert q.counters().done == 1

    # A task put while it waits is taken as soon as it comes
    q.put("second")
    lease = take_lease(q)
    threading.Timer(0.2, q.put, args=("third",)).start()
    after = q.ack_and_take(lease, timeout=5)
    assert after is not None and bodies(after) == ["third"]
    q.ack(after)
    c = q.counters()
    assert (c.done, c.pending, c.in_flight) == (3, 0, 0)


def test_a_stale_ack_in_ack_and_take_changes_nothing(make: Factory) -> None:
    # Given consumer A whose lease was reaped while it was stalled: the task is ready again
    a, b, stale, before = reaped_lease(make)

    # When A wakes up and acknowledges it, failed, together with its next take
    (env,) = stale.envelopes()
    again = a.ack_and_take(stale, [Failure(env, "E", "tb")], max_tasks=10, timeout=1)

    # Then the ack counted nothing and wrote no dead letter; the task is simply
    # delivered again (here to A itself) and counts once when that is acknowledged
    c = b.counters()
    assert (c.done, c.failed, c.pending, c.dead) == (before.done, 0, 1, 0)
    assert b.dead_letters() == []
    assert again is not None and [e.id for e in again.envelopes()] == [env.id]
    assert a.stale_leases == 1
    a.ack(again)
    assert a.stale_leases == 1
    c = b.counters()
    assert (c.done, c.failed, c.pending, c.in_flight) == (1, 0, 0, 0)


@pytest.mark.parametrize(
    "run", [None, 1, 0], ids=["both-ran", "only-the-ack-ran", "nothing-ran"]
)
def test_ack_and_take_after_a_lost_reply_acks_once_and_strands_nothing(
    make: Factory, monkeypatch: pytest.MonkeyPatch, run: int | None
) -> None:
    # Given a lease, tasks ready, and a connection that breaks on the next pipeline
    q = make()
    q.attach_consumer()
    warm(q)
    q.put_many(range(5))
    lease = q.take(2, timeout=1)
    assert lease is not None
    _, second = lease.envelopes()
    lose_pipeline_reply(monkeypatch, run)

    # When ack_and_take sends the pair again after the lost reply
    failures = [Failure(second, "E", "tb", retry_in=60)]
    after = q.ack_and_take(lease, failures, max_tasks=10, timeout=1)

    # Then the ack applied once (one done, one retry) and the tasks that the lost
    # take moved are in the new lease, none left behind in flight
    assert after is not None and bodies(after) == [2, 3, 4]
    c = q.counters()
    assert (c.done, c.retried, c.delayed, c.pending) == (1 + 1, 1, 1, 4)  # 1 warm-up
    assert c.in_flight == after.size == 3
    q.ack(after)
    assert q.counters().in_flight == 0


def test_a_lost_reply_then_a_new_epoch_strands_nothing(
    make: Factory, client: FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a lease of two, three tasks ready, and a pipeline whose reply is lost
    # while a producer reopens the queue (a new close epoch) before the resend
    q = make()
    q.attach_consumer()
    warm(q)
    q.put_many(range(5))
    lease = q.take(2, timeout=1)
    assert lease is not None
    real = redis.client.Pipeline.execute
    armed = [True]

    def execute(pipe: redis.client.Pipeline, raise_on_error: bool = True) -> list[Any]:
        replies = real(pipe, raise_on_error)
        if armed[0]:
            armed[0] = False
            client.incr(q.keys.epoch)
            raise redis.exceptions.ConnectionError("reply lost")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)

    # When ack_and_take resends: its take finds the new epoch and takes again
    after = q.ack_and_take(lease, max_tasks=10, timeout=1)

    # Then that take adopts the three tasks the lost take moved (the in-flight
    # length the ack left, not the one before the ack, tells them apart)
    assert after is not None and bodies(after) == [2, 3, 4]
    c = q.counters()
    assert (c.done, c.in_flight, c.pending) == (1 + 2, 3, 3)  # 1 warm-up


def test_a_repeated_ack_never_takes_a_copy_of_its_task(
    make: Factory, client: FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a task put twice (a put whose reply was lost): two equal messages,
    # both pending, and a lease holding the first
    q = make()
    q.attach_consumer()
    warm(q)
    q._put_bodies(["dup"])
    raw = client.lindex(q.keys.ready, 0)
    assert isinstance(raw, bytes)
    q._put([raw], 1)
    lease = q.take(1, timeout=1)
    assert lease is not None
    (env,) = lease.envelopes()
    lose_pipeline_reply(monkeypatch)

    # When its failure is acknowledged with ack_and_take, the take moves the copy
    # into flight, the reply is lost and both are sent again
    after = q.ack_and_take(lease, [Failure(env, "E", "tb", retry_in=0.3)], timeout=1)

    # Then the repeated ack did not match the copy: the copy is the next lease,
    # the retry is delayed once, and both copies are still pending
    assert after is not None and after.receipt.messages == [raw]
    c = q.counters()
    assert (c.pending, c.in_flight, c.delayed, c.retried) == (2, 1, 1, 1)
    q.ack(after)
    retry = take_lease(q)
    assert [(e.body, e.attempts) for e in retry.envelopes()] == [("dup", 1)]
    q.ack(retry)
    c = q.counters()
    assert (c.pending, c.in_flight, c.delayed, c.ready) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    "kept", [(), ("ack",), ("take",)], ids=["both-lost", "take-lost", "ack-lost"]
)
def test_ack_and_take_reloads_scripts_the_server_lost(
    make: Factory, client: FakeRedis, kept: tuple[str, ...]
) -> None:
    q = make()
    q.attach_consumer()
    warm(q)
    q.put_many(range(3))
    lease = q.take(1, timeout=1)
    assert lease is not None
    client.script_flush()  # the server restarted
    for name in kept:
        client.script_load(q._link.script(name).script)

    after = q.ack_and_take(lease, max_tasks=10, timeout=1)

    assert after is not None and bodies(after) == [1, 2]
    c = q.counters()
    assert (c.done, c.in_flight, c.pending) == (2, 2, 2)


def test_ack_and_take_stops_at_its_sentinel_and_drops_a_stale_one(make: Factory) -> None:
    # Given A holding a lease; two tasks, then one sentinel per consumer
    a, b = make(), make()
    a.attach_consumer()
    b.attach_consumer()
    a.put_many([0, 1, 2])
    lease = take_lease(a)
    a.close()

    # When A acknowledges and asks for many, it gets the tasks and one sentinel
    after = a.ack_and_take(lease, max_tasks=100, timeout=1)
    assert after is not None and bodies(after) == [1, 2] and after.sentinel is not None
    a.ack(after)
    a.detach_consumer()  # A exits, as a consumer does at its sentinel

    # A producer reopens the queue: B's sentinel is stale, B only gets the new task
    a.attach_producer()
    a.put(3)
    lease = take_lease(b)
    assert bodies(lease) == [3] and lease.sentinel is None
    a.detach_producer()  # closes again: a fresh sentinel for B
    after = b.ack_and_take(lease, max_tasks=100, timeout=1)
    assert after is not None and after.size == 0 and after.sentinel is not None
    b.ack(after)
    c = a.counters()
    assert (c.done, c.pending, c.ready, c.in_flight) == (4, 0, 0, 0)


def test_ack_and_take_on_a_closed_drained_queue_returns_a_sentinel(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put("last")
    lease = take_lease(q)
    q.close()
    placed = take_lease(q)  # the one sentinel close placed (a second handle could hold it)
    assert placed.sentinel is not None
    q.ack(placed)

    after = q.ack_and_take(lease, timeout=None)  # would wait for ever if it had no answer

    assert after is not None and after.sentinel is not None and after.size == 0
    q.ack(after)
    assert q.counters().pending == 0


def test_a_reap_between_the_ack_and_the_take_costs_a_round_trip_not_a_task(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a lease, tasks ready, and a reaper that runs between the two scripts
    q = make()
    q.attach_consumer()
    warm(q)
    q.put_many(range(4))
    lease = q.take(1, timeout=1)
    assert lease is not None and q._consumer_id is not None
    real = redis.client.Pipeline.execute
    me, reap = q._consumer_id, q._link.script("reap")

    def execute(pipe: redis.client.Pipeline, raise_on_error: bool = True) -> list[Any]:
        k = q.keys
        pipe.evalsha(reap.sha, 4, k.consumers, k.consumer_beats, k.ready, k.acked,
                     "id", me, k.inflight_prefix, b"")  # fmt: skip
        pipe.command_stack.insert(1, pipe.command_stack.pop())
        acked, _reaped, taken = real(pipe, raise_on_error)
        return [acked, taken]

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)

    # When it acknowledges and takes
    after = q.ack_and_take(lease, max_tasks=10, timeout=1)

    # Then the take saw its ack's token gone, did nothing, and a plain take followed
    assert after is not None and bodies(after) == [1, 2, 3]
    c = q.counters()
    assert (c.done, c.in_flight, c.pending, c.consumers) == (1 + 1, 3, 3, 1)  # 1 warm-up


def test_ack_and_take_of_a_lease_from_an_earlier_registration(make: Factory) -> None:
    q = make()
    q.attach_consumer()
    q.put_many(["a", "b"])
    old = take_lease(q)
    q.detach_consumer()  # "a" goes back to ready
    q.attach_consumer()

    after = q.ack_and_take(old, max_tasks=10, timeout=1)

    assert after is not None and bodies(after) == ["a", "b"]
    assert q.counters().done == 0
    q.ack(after)
    c = q.counters()
    assert (c.done, c.pending, c.in_flight) == (2, 0, 0)


# ---------------------------------------------------------------- issue 8: liveness, deaths


def test_keep_alive_keeps_a_consumer_whose_heartbeat_thread_starves(make: Factory) -> None:
    # Given a consumer whose own heartbeat stopped (a handler holds its GIL)
    worker, supervisor = make(heartbeat_ttl=0.3), make(heartbeat_ttl=0.3)
    worker.attach_consumer()
    assert worker._heartbeat is not None
    worker._heartbeat.stop()
    # When its supervisor vouches for its pid, past several TTLs
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        supervisor.keep_alive([os.getpid()])
        assert supervisor.reap() == 0
        time.sleep(0.05)
    # Then it was never reaped; without the supervisor, it is
    assert supervisor.counters().consumers == 1
    wait_for(lambda: supervisor.counters().consumers == 0, timeout=5, message="expiry")


def test_fail_running_fails_the_timed_out_task_and_release_counts_no_death(
    make: Factory,
) -> None:
    worker, supervisor = make(), make()
    worker.attach_consumer()
    supervisor.put_many(["stuck", "next"])
    lease = worker.take(2, timeout=1)
    assert lease is not None and bodies(lease) == ["stuck", "next"]
    stuck = next(iter(lease.envelopes()))

    # When the supervisor killed the worker for a timeout on "stuck"
    assert supervisor.fail_running(os.getpid(), stuck.id, lambda env: Failure(env, "late"))
    assert supervisor.release(os.getpid()) == 1

    # Then "stuck" is dead-lettered as failed, "next" is ready again, unsuspected
    c = supervisor.counters()
    assert (c.failed, c.dead, c.ready, c.pending) == (1, 1, 1, 1)
    assert supervisor.dead_letters()[0]["error"] == "late"
    supervisor.attach_consumer()
    again = supervisor.take(5, timeout=1)
    assert again is not None and bodies(again) == ["next"] and again.deaths == 0


def test_an_ack_of_a_stale_lease_says_it_was_not_applied(make: Factory) -> None:
    worker, supervisor = make(), make()
    worker.attach_consumer()
    supervisor.put("t")
    lease = worker.take(1, timeout=1)
    assert lease is not None
    supervisor.evict(os.getpid())

    assert worker.ack(lease) is False and worker.ack_applied is False
    assert supervisor.counters().done == 0


def test_an_outage_is_one_line_when_lost_and_one_when_back(
    client: FakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a link that was connected, then fails three times: once in a call that
    # does not retry (as a heartbeat's), twice more in one that does
    link = Link("redis://unused", client, retry_for=30)
    link.client()
    failures = [3]

    def op(c: redis.Redis) -> str:
        if failures[0]:
            failures[0] -= 1
            raise redis.exceptions.ConnectionError("server away")
        return "ok"

    with caplog.at_level("WARNING", logger="pcq"):
        with pytest.raises(BackendUnavailable):
            link.call(op, retry=False)
        assert link.call(op) == "ok"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("pcq: lost the link to Redis") and "is back after" in lines[1]


def test_past_the_budget_every_call_fails_at_once_with_backend_lost(client: FakeRedis) -> None:
    link = Link("redis://unused", client, retry_for=0.2)
    link.client()

    def down(c: redis.Redis) -> None:
        raise redis.exceptions.ConnectionError("server away")

    with pytest.raises(BackendLost):
        link.call(down)
    started = time.monotonic()
    with pytest.raises(BackendLost):
        link.call(lambda c: c.ping())  # the server may answer: the run is over anyway
    with pytest.raises(BackendLost):
        link.probe()
    assert time.monotonic() - started < 0.1
