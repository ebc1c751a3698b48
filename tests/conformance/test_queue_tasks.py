"""Conformance: what happens to a task — put, take, ack, retry, dead letters,
give back, stale acknowledgements, bad input.  Runs against every backend."""

from __future__ import annotations

import os
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from helpers import take_lease

from pcq.backends.base import Failure
from pcq.errors import SerializationError

if TYPE_CHECKING:
    from conftest import QueueFactory

BODIES = [
    pytest.param(None, id="none"),
    pytest.param(b"\x00\xff raw bytes", id="bytes"),
    pytest.param("", id="empty-str"),
    pytest.param("sausage \u00e9\u00e8 \U0001f32d", id="str"),
    pytest.param(0, id="zero"),
    pytest.param(-(2**63), id="int64-min"),
    pytest.param(1.5, id="float"),
    pytest.param(False, id="false"),
    pytest.param([], id="empty-list"),
    pytest.param([1, [2, [3, None]], "x", b"y"], id="nested-list"),
    pytest.param({"a": {"b": [None, b"x", {"c": 1.25}]}, "n": 3}, id="nested-dict"),
    pytest.param({1: "int key"}, id="int-key-dict"),
]


@pytest.mark.parametrize("body", BODIES)
def test_every_msgpack_value_is_a_task_body(make_queue: QueueFactory, body: Any) -> None:
    # Given a consumer, when a task is put, taken and acknowledged
    q = make_queue()
    q.attach_consumer()
    q.put(body)
    lease = take_lease(q)

    # Then the body arrives unchanged, as a task and not a sentinel
    envelopes = list(lease.envelopes())
    assert [env.body for env in envelopes] == [body]
    assert envelopes[0].attempts == 0
    assert lease.sentinel is None
    q.ack(lease)
    c = q.counters()
    assert (c.produced, c.done, c.failed, c.pending, c.in_flight) == (1, 1, 0, 0, 0)


def test_tasks_come_out_in_the_order_they_were_put(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    assert q.put_many(range(10)) == 10
    q.put("last")
    c = q.counters()
    assert (c.produced, c.pending, c.done) == (11, 11, 0)

    taken: list[Any] = []
    while len(taken) < 11:
        lease = take_lease(q)
        taken.extend(env.body for env in lease.envelopes())
        q.ack(lease)

    assert taken == [*range(10), "last"]
    c = q.counters()
    assert (c.produced, c.done, c.pending, c.ready, c.in_flight) == (11, 11, 0, 0, 0)


def test_task_ids_are_unique(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put_many(["a", "b", "c"])
    q.put("d")
    ids = []
    while len(ids) < 4:
        lease = take_lease(q)
        ids.extend(env.id for env in lease.envelopes())
        q.ack(lease)
    assert len(set(ids)) == 4


def test_a_taken_task_is_in_flight_until_acknowledged(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("a")
    q.put("b")
    lease = take_lease(q)

    c = q.counters()
    assert c.pending == 2
    assert c.in_flight == lease.size == 1
    assert c.ready == 1
    q.ack(lease)
    c = q.counters()
    assert (c.pending, c.in_flight, c.ready, c.done) == (1, 0, 1, 1)


def test_counters_after_done_failed_and_given_back(make_queue: QueueFactory) -> None:
    # Given three tasks
    q = make_queue()
    q.attach_consumer()
    for body in ("ok", "bad", "later"):
        q.put(body)

    # When one is handled, one fails for good and one is handed back unstarted
    for _ in range(3):
        lease = take_lease(q)
        (env,) = lease.envelopes()
        if env.body == "ok":
            q.ack(lease)
        elif env.body == "bad":
            q.ack(lease, [Failure(env, "ValueError: bad", "Traceback: ...")])
        else:
            q.ack(lease, give_back=[env])

    # Then only the handed-back task is still pending
    c = q.counters()
    assert (c.produced, c.done, c.failed, c.retried, c.dead, c.pending) == (3, 1, 1, 0, 1, 1)
    assert not q.join(timeout=0.05)


def test_a_failed_task_is_retried_with_one_more_attempt(make_queue: QueueFactory) -> None:
    # Given a task whose first attempt failed with a retry
    q = make_queue()
    q.attach_consumer()
    q.put({"n": 7})
    lease = take_lease(q)
    (first,) = lease.envelopes()
    q.ack(lease, [Failure(first, "ValueError: boom", "Traceback ...", retry_in=0.01)])
    c = q.counters()
    assert (c.retried, c.pending, c.done, c.failed, c.dead) == (1, 1, 0, 0, 0)

    # Then it comes back: same task, same body, attempts + 1
    lease = take_lease(q)
    (again,) = lease.envelopes()
    assert (again.id, again.body, again.attempts) == (first.id, {"n": 7}, 1)

    # And once it succeeds it is done
    q.ack(lease)
    c = q.counters()
    assert (c.retried, c.done, c.failed, c.pending) == (1, 1, 0, 0)


def test_a_retry_waits_for_its_delay(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("x")
    lease = take_lease(q)
    (env,) = lease.envelopes()
    acked = time.monotonic()
    q.ack(lease, [Failure(env, "E", "", retry_in=0.3)])

    lease = take_lease(q)

    assert time.monotonic() - acked >= 0.25
    assert [e.attempts for e in lease.envelopes()] == [1]
    q.ack(lease)


def test_a_task_out_of_retries_is_dead_lettered_with_error_and_traceback(
    make_queue: QueueFactory,
) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put(["payload", 1])
    lease = take_lease(q)
    (env,) = lease.envelopes()
    q.ack(lease, [Failure(env, "E", "tb", retry_in=0.0)])
    lease = take_lease(q)
    (env,) = lease.envelopes()

    # When the last attempt fails too
    q.ack(lease, [Failure(env, "KeyError: 'k'", "Traceback (most recent call last):\n  ...")])

    # Then it is counted failed, no longer pending, and kept as a dead letter
    c = q.counters()
    assert (c.failed, c.dead, c.retried, c.done, c.pending) == (1, 1, 1, 0, 0)
    assert q.join(timeout=1)
    (letter,) = q.dead_letters()
    assert letter["error"] == "KeyError: 'k'"
    assert letter["traceback"].startswith("Traceback (most recent call last)")
    # attempts = attempts made, as the consumer's log says "attempt 2/2"
    assert (letter["id"], letter["body"], letter["attempts"]) == (env.id, ["payload", 1], 2)


def test_dead_letters_can_be_requeued_or_purged(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("a")
    q.put("b")
    for _ in range(2):
        lease = take_lease(q)
        q.ack(lease, [Failure(env, "E", "tb") for env in lease.envelopes()])
    assert q.counters().dead == 2

    # requeue: the dead tasks come back with their attempts reset
    assert q.requeue_dead() == 2
    assert q.counters().dead == 0
    back = []
    while len(back) < 2:
        lease = take_lease(q)
        envelopes = list(lease.envelopes())
        back += [(env.body, env.attempts) for env in envelopes]
        q.ack(lease, [Failure(env, "E", "tb") for env in envelopes if env.body == "a"])
    assert sorted(back) == [("a", 0), ("b", 0)]

    # purge_dead: deleted for good
    assert q.counters().dead == 1
    assert q.purge_dead() == 1
    assert (q.counters().dead, q.dead_letters()) == (0, [])
    assert q.join(timeout=1)


def test_given_back_tasks_return_unstarted(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("back")
    lease = take_lease(q)
    (env,) = lease.envelopes()

    q.ack(lease, give_back=[env])

    c = q.counters()
    assert (c.done, c.failed, c.retried, c.pending) == (0, 0, 0, 1)
    lease = take_lease(q)
    (again,) = lease.envelopes()
    assert (again.id, again.body, again.attempts) == (env.id, "back", 0)
    q.ack(lease)
    assert q.counters().done == 1


def test_acknowledging_a_lease_twice_counts_it_once(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("once")
    lease = take_lease(q)

    q.ack(lease)
    q.ack(lease)

    c = q.counters()
    assert (c.done, c.pending, c.produced) == (1, 0, 1)


def test_a_failure_acknowledged_twice_is_retried_once(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.attach_consumer()
    q.put("flaky")
    lease = take_lease(q)
    (env,) = lease.envelopes()
    failure = Failure(env, "E", "tb", retry_in=0.0)

    q.ack(lease, [failure])
    q.ack(lease, [failure])

    assert q.counters().retried == 1
    retry = take_lease(q)
    assert [e.attempts for e in retry.envelopes()] == [1]
    q.ack(retry)
    c = q.counters()
    assert (c.done, c.retried, c.pending) == (1, 1, 0)
    assert q.take(1, timeout=0.1) is None  # no second copy of the retry


def test_ack_after_detach_is_stale(make_queue: QueueFactory) -> None:
    # Given consumer A holding a task
    a = make_queue()
    a.attach_consumer()
    a.put("task")
    stale = take_lease(a)

    # When A detaches, its task goes back to ready and consumer B takes it
    a.detach_consumer()
    b = make_queue.handle(a)
    b.attach_consumer()
    fresh = take_lease(b)
    assert [e.id for e in fresh.envelopes()] == [e.id for e in stale.envelopes()]

    # Then A's late acknowledgement changes no counter, B's counts once
    a.ack(stale)
    c = b.counters()
    assert (c.done, c.failed, c.retried, c.pending) == (0, 0, 0, 1)
    b.ack(fresh)
    c = b.counters()
    assert (c.done, c.pending) == (1, 0)


@pytest.mark.parametrize(
    ("item", "type_name"),
    [(object(), "object"), ({1, 2}, "set"), (1j, "complex"), (2**64, "int")],
    ids=["object", "set", "complex", "huge-int"],
)
def test_put_of_an_unencodable_item_names_its_type(
    make_queue: QueueFactory, item: Any, type_name: str
) -> None:
    q = make_queue()

    with pytest.raises(SerializationError, match=f"type '{type_name}'"):
        q.put(item)
    with pytest.raises(SerializationError, match=f"type '{type_name}'"):
        q.put_many([item])

    c = q.counters()
    assert (c.produced, c.pending) == (0, 0)


class _RunsCode:
    """A pickle that creates a file when it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("garbage", "not msgpack"),
        ("pickle", "not"),
        ("foreign-msgpack", "not a pcq envelope"),
        ("malformed-envelope", "malformed"),
    ],
)
def test_an_undecodable_message_is_dead_lettered_with_its_reason(
    make_queue: QueueFactory, tmp_path: Any, kind: str, reason: str
) -> None:
    marker = str(tmp_path / "unpickled")
    raw = {
        "garbage": b"garbage",
        "pickle": pickle.dumps(_RunsCode(marker)),
        "foreign-msgpack": msgpack.packb({"task": 1}),
        "malformed-envelope": msgpack.packb([0x70, 0, "tag"]),
    }[kind]
    # Given a message that is no task, then a good task.  `_put(..., 0)` adds
    # a message that holds no task: it is not counted pending.
    q = make_queue()
    q.attach_consumer()
    q._put([raw], 0)
    q.put("good")

    # When the consumer takes the bad message
    lease = take_lease(q)
    assert lease.batches == []
    ((bad, why),) = lease.bad
    assert bad == raw and reason in why
    q.ack(lease)

    # Then it is a dead letter with the reason, never executed, and the good
    # task after it is handled as usual
    (letter,) = q.dead_letters()
    assert letter["raw"] == raw and reason in letter["error"]
    assert not os.path.exists(marker)
    lease = take_lease(q)
    assert [e.body for e in lease.envelopes()] == ["good"]
    q.ack(lease)
    c = q.counters()
    assert (c.produced, c.done, c.failed, c.dead, c.pending) == (1, 1, 0, 1, 0)


def test_purge_drops_ready_tasks_and_join_returns(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put_many(range(5))

    assert q.purge() == 5

    assert q.counters().pending == 0
    assert q.join(timeout=1)
    q.attach_consumer()
    assert q.take(1, timeout=0.1) is None


def test_a_burst_is_not_held_back_while_the_producer_waits(make_queue: QueueFactory) -> None:
    # Given a producer that yields a quick burst of cheap tasks, then waits until
    # they are handled before it yields more (a request/response producer)
    q = make_queue()
    q.note_task_cost(1e-7)  # cheap tasks: batches could be large
    q.attach_consumer()
    handled = threading.Event()
    waited: list[bool] = []

    def produce() -> Any:
        yield from range(3)
        waited.append(handled.wait(timeout=10))
        yield 3

    producer = threading.Thread(target=q.put_many, args=(produce(),))
    producer.start()
    # When a consumer takes what is there
    seen: list[Any] = []
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        lease = q.take(1024, timeout=0.5)
        if lease is not None:
            seen += [b for batch in lease.batches for b in batch.bodies]
            q.ack(lease)
    handled.set()
    producer.join(timeout=10)
    # Then the whole burst arrived while the producer was still waiting
    assert seen == [0, 1, 2]
    assert waited == [True]
    assert [e.body for e in take_lease(q).envelopes()] == [3]
