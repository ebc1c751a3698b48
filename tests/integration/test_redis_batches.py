"""Redis moves batches (issue #20): a list element is a message that holds a
batch of tasks.  Against a real redis-server: the server's cuts are what the
client's encoder writes, a take cuts a message to what it wants, a dead
consumer's batch comes back one suspect a task, and `queued` — the count of
tasks in ready that maxsize and status read — always equals what the list
holds, through a randomized storm of every move the scripts make."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import suppress
from importlib.resources import files
from typing import Any

import msgpack
import pytest
import redis
from redis_server import RedisServer

from pcq.backends.base import Failure, Lease
from pcq.backends.redis import RedisQueue
from pcq.envelope import (
    SENTINEL_PREFIX,
    Batch,
    DecodeError,
    decode,
    encode_sentinel,
    encode_tasks,
)

#: A driver for the library: count, one_each or cut ARGV[1].
DRIVER = """
local m, mode = ARGV[1], ARGV[2]
if mode == 'count' then return tasks_in(m) end
if mode == 'head' then return SENTINEL_HEAD end
if mode == 'one' then return one_each(m) end
local sizes = {}
for i = 3, #ARGV do sizes[#sizes + 1] = tonumber(ARGV[i]) end
return cut(m, sizes) or 'not cut'
"""

BODIES: list[Any] = [
    None, True, False, 0, 127, 128, -1, -33, 2**40, -(2**40), 2**64 - 1, 1.5, "x", "é" * 100,
    "y" * 70_000, b"\x00" * 300, b"z" * 70_000, [1, [2, [3, []]]], {"a": {"b": [1, 2]}},
    {i: i for i in range(20)}, list(range(20)), msgpack.ExtType(5, b"abc"),
    msgpack.ExtType(7, b"q" * 300), msgpack.ExtType(1, b"12345678"),
]


@pytest.fixture
def server(shared_redis: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=shared_redis.port)


@pytest.fixture
def library(server: redis.Redis) -> Any:
    source = files("pcq.backends").joinpath("lib").joinpath("batches.lua")
    return server.register_script(source.read_text(encoding="utf-8") + DRIVER)


@pytest.fixture
def queues(redis_url: str) -> Iterator[Any]:
    made: list[RedisQueue] = []
    name = f"batches-{uuid.uuid4().hex[:8]}"

    def make(**kw: Any) -> RedisQueue:
        q = RedisQueue(name, url=redis_url, heartbeat_ttl=60, **kw)
        made.append(q)
        return q

    yield make
    for q in made:
        with suppress(Exception):
            q.detach_consumer()


def ready_tasks(server: redis.Redis, q: RedisQueue) -> int:
    """The tasks in ready, read from the list itself (sentinels left out)."""
    n = 0
    for raw in server.lrange(q.keys.ready, 0, -1):
        try:
            msg = decode(raw)
        except DecodeError:
            n += 1
            continue
        n += len(msg.bodies) if isinstance(msg, Batch) else 0
    return n


def values(lease: Lease | None) -> list[Any]:
    assert lease is not None
    return [env.body for env in lease.envelopes()]


def cheap(q: RedisQueue) -> None:
    """Report cheap tasks and let an ack carry the report, so puts batch."""
    q.note_task_cost(1e-6)
    q.put("report")
    lease = q.take(1, timeout=1)
    assert lease is not None
    q.ack(lease)


# ---------------------------------------------------------- the server's cuts


@pytest.mark.parametrize("seq", [0, 5, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32,
                                 2**40])
def test_the_servers_cuts_are_what_the_encoder_writes(library: Any, seq: int) -> None:
    m = encode_tasks("tagABC", seq, BODIES, attempts=3, enqueued_at=1234.5)
    n = len(BODIES)
    assert library(args=[m, "count"]) == n
    assert library(args=[m, "one"]) == [
        encode_tasks("tagABC", seq + i, [b], attempts=3, enqueued_at=1234.5)
        for i, b in enumerate(BODIES)]
    rng = random.Random(seq)
    for _ in range(5):
        a = rng.randint(1, n - 2)
        b = rng.randint(1, n - a - 1)
        got = library(args=[m, "cut", a, b, n - a - b])
        assert got == [encode_tasks("tagABC", seq, BODIES[:a], 3, 1234.5),
                       encode_tasks("tagABC", seq + a, BODIES[a:a + b], 3, 1234.5),
                       encode_tasks("tagABC", seq + a + b, BODIES[a + b:], 3, 1234.5)]


def test_a_batch_of_70000_tasks_is_counted_and_cut(library: Any) -> None:
    m = encode_tasks("t" * 300, 9, list(range(70_000)), enqueued_at=1.0)
    assert library(args=[m, "count"]) == 70_000
    assert library(args=[m, "cut", 1, 69_999]) == [
        encode_tasks("t" * 300, 9, [0], enqueued_at=1.0),
        encode_tasks("t" * 300, 10, list(range(1, 70_000)), enqueued_at=1.0)]


def test_what_is_not_a_task_message_is_never_cut(library: Any) -> None:
    good = encode_tasks("tag", 1, [1, 2, 3])
    assert library(args=[encode_sentinel(3), "count"]) == 0
    for garbage in [b"", b"garbage", b"\x97\x70\x00", b"\x97\x70\x00\xa3tag\xcf", b"\xc1" * 9]:
        assert library(args=[garbage, "count"]) == 1
    for garbage in [b"", b"garbage", good[:-1], good + b"\x00", b"\x97\x70\x00\xa3tag\xcf"]:
        assert library(args=[garbage, "one"]) == [garbage]
        assert library(args=[garbage, "cut", 1, 2]) == b"not cut"


def test_the_librarys_sentinel_head_is_the_encoders(library: Any) -> None:
    assert library(args=[b"", "head"]) == SENTINEL_PREFIX


# ------------------------------------------------------------ takes and reaps


def test_a_take_of_fewer_tasks_cuts_a_message_and_leaves_the_rest_next(
    queues: Any, server: redis.Redis
) -> None:
    # Given ten tasks put as one message
    q = queues()
    q.attach_consumer()
    cheap(q)
    q.put_many(range(10))
    first = q.take(1, timeout=1)
    assert values(first) == [0]  # the first item of a put goes at once, alone
    q.ack(first)
    assert server.llen(q.keys.ready) == 1

    # When a consumer takes three
    lease = q.take(3, timeout=1)

    # Then it has three, and the other six wait in one message, taken next
    assert values(lease) == [1, 2, 3]
    c = q.counters()
    assert (c.ready, c.in_flight, c.pending) == (6, 3, 9)
    assert server.llen(q.keys.ready) == 1 and ready_tasks(server, q) == 6
    assert values(q.take(100, timeout=1)) == [4, 5, 6, 7, 8, 9]


def test_a_dead_consumers_batch_comes_back_one_suspect_a_task(
    queues: Any, server: redis.Redis
) -> None:
    # Given a consumer that took twenty tasks put as one message, then died
    q = queues()
    q.attach_consumer()
    cheap(q)
    q.put_many(range(21))
    q.ack(q.take(1, timeout=1))  # the put's first item, sent alone
    lease = q.take(100, timeout=1)
    assert values(lease) == list(range(1, 21))
    dead = q._consumer_id
    assert dead is not None

    # When it is reaped as dead
    other = queues()
    assert other._reap("prefix", dead) == 20

    # Then each task is a suspect of its own, blamed once, handed out alone
    suspects = server.lrange(q.keys.suspects, 0, -1)
    assert len(suspects) == 20
    assert all(server.hget(q.keys.deaths, m) == b"1" for m in suspects)
    other.attach_consumer()
    seen = []
    for _ in range(20):
        one = other.take(100, timeout=1)
        assert one is not None and one.deaths == 1 and len(values(one)) == 1
        seen += values(one)
        other.ack(one)
    assert sorted(seen) == list(range(1, 21))
    assert server.hlen(q.keys.deaths) == 0
    c = other.counters()
    assert (c.done, c.pending, c.ready, c.in_flight) == (22, 0, 0, 0)  # with cheap()'s


def test_a_queue_without_the_count_gets_it_from_its_list_and_a_read_writes_nothing(
    queues: Any, server: redis.Redis
) -> None:
    # Given a queue written before `queued` was kept: tasks in ready, no count
    q = queues()
    q.attach_consumer()
    cheap(q)
    q.put_many(range(30))
    server.hdel(q.keys.counters, "queued")

    # When it is read, then put to
    assert q.counters().ready == 30
    assert not server.hexists(q.keys.counters, "queued")  # reading wrote nothing
    q.put_many(range(5))

    # Then the count is what the list holds
    assert int(server.hget(q.keys.counters, "queued") or 0) == 35 == ready_tasks(server, q)


# ------------------------------------------------------------------ the storm


def storm_step(rng: random.Random, q: RedisQueue, consumers: list[RedisQueue],
               held: dict[int, list[Lease]], fresh: Any) -> None:
    """One random move of the queue's scripts: put, take, ack (with failures,
    retries and give-backs), a death or a detach, a requeue or a purge."""
    op = rng.choices(["put", "take", "ack", "die", "detach", "requeue", "purge"],
                     weights=[6, 8, 8, 1, 1, 1, 0.3])[0]
    i = rng.randrange(len(consumers))
    c = consumers[i]
    if op == "put":
        q.put_many(range(rng.randint(1, 200)))
    elif op == "take":
        lease = c.take(rng.choice([1, 3, 50, 1000]), timeout=0)
        if lease is not None and lease.size:
            held[i].append(lease)
    elif op == "ack" and held[i]:
        lease = held[i].pop(rng.randrange(len(held[i])))
        envs = list(lease.envelopes())
        rng.shuffle(envs)
        k, g = rng.randint(0, len(envs)), rng.randint(0, len(envs))
        failures = [Failure(e, "boom", retry_in=rng.choice([None, 0.0]))
                    for e in envs[:min(k, 3)]]
        back = envs[len(failures):len(failures) + min(g, 5)] if rng.random() < 0.3 else []
        c.ack(lease, failures, back)
    elif op in ("die", "detach"):
        assert c._consumer_id is not None
        q._reap("prefix" if op == "die" else "id", c._consumer_id)
        replace(consumers, held, i, fresh)
    elif op == "requeue":
        q.requeue_dead()
    elif op == "purge":
        q.purge()
        for j in range(len(consumers)):
            replace(consumers, held, j, fresh)


def replace(consumers: list[RedisQueue], held: dict[int, list[Lease]], i: int,
            fresh: Any) -> None:
    """Consumer ``i`` is gone (reaped or purged): a new one takes its place."""
    consumers[i].detach_consumer()
    consumers[i], held[i] = fresh(), []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_queued_is_what_ready_holds_through_a_random_storm(
    queues: Any, server: redis.Redis, seed: int
) -> None:
    rng = random.Random(seed)
    q = queues()
    q.attach_consumer()
    cheap(q)  # puts travel as batches

    def fresh() -> RedisQueue:
        c = queues(max_deliveries=2)
        c.attach_consumer()
        if rng.random() < 0.5:
            c.note_task_cost(rng.choice([1e-6, 1e-4, 2e-3]))  # batches of 1024, 50, 2
        return c

    consumers = [fresh() for _ in range(3)]
    held: dict[int, list[Lease]] = {i: [] for i in range(3)}
    for _ in range(400):
        storm_step(rng, q, consumers, held, fresh)
        counted = int(server.hget(q.keys.counters, "queued") or 0)
        assert counted == ready_tasks(server, q)
        c = q.counters()
        assert c.pending == c.ready + c.in_flight + c.delayed

    # And everything left drains: every task produced ends done or failed
    for i, leases in held.items():
        for lease in leases:
            consumers[i].ack(lease)
    last = fresh()
    while (c := q.counters()).pending:
        lease = last.take(1000, timeout=1 if c.delayed else 0)
        if lease is not None:
            last.ack(lease)
    c = q.counters()
    assert c.ready == c.in_flight == 0 and ready_tasks(server, q) == 0
