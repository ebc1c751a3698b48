"""pcq.JoinableQueue beyond CPython's own tests (test_joinable_stdlib.py): what
travels, misuse, a consumer's normal exit and its death, threads, and a Redis
queue shared by name.  Every test runs on the local backend and on a real
redis-server unless it is about one of them."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

import pcq
from pcq import joinable_items

Make = Callable[..., pcq.JoinableQueue]


@pytest.fixture(params=["local", "redis"])
def make(request: pytest.FixtureRequest) -> Make:
    """A factory of fresh queues on one backend (Redis: a heartbeat TTL of 1 s,
    so a killed consumer's item comes back within seconds)."""
    if request.param == "local":
        return pcq.JoinableQueue
    url = request.getfixturevalue("redis_url")

    def on_redis(maxsize: int = 0) -> pcq.JoinableQueue:
        return pcq.JoinableQueue(maxsize, url=url, name=f"jq-{uuid.uuid4().hex[:12]}",
                                 heartbeat_ttl=1.0)

    return on_redis


@dataclasses.dataclass
class Point:
    x: int
    y: int


ITEMS = [None, 0, -1.5, "text", b"\x00bytes", True, [], (), [1, (2, 3)], (1, [2, (3,)]),
         {"a": (1, None)}, {(1, 2): "tuple key"}, [None, None]]


# --------------------------------------------------------------------------- items


def test_every_msgpack_value_comes_back_as_put(make: Make) -> None:
    # Given a queue, when every kind of msgpack value is put (tuples nested,
    # as map keys, and None, an ordinary item), then each comes back equal,
    # tuples as tuples, in order
    q = make()
    for item in ITEMS:
        q.put(item)
    got = [q.get(timeout=5) for _ in ITEMS]
    assert got == ITEMS
    assert [type(x) for x in got] == [type(x) for x in ITEMS]


def test_local_queue_carries_what_pickle_carries() -> None:
    # The local broker's socket is private to the user's processes: pickle,
    # as the standard library's queue
    q = pcq.JoinableQueue()
    q.put(Point(1, 2))
    q.put({1, 2})
    assert q.get(timeout=5) == Point(1, 2)
    assert q.get(timeout=5) == {1, 2}
    with pytest.raises(pcq.SerializationError, match=r"'function'.*cannot be pickled"):
        q.put(lambda: None)
    assert q.qsize() == 0


def test_redis_queue_refuses_what_msgpack_cannot_carry_at_put(redis_url: str) -> None:
    q = pcq.JoinableQueue(url=redis_url, name=f"jq-{uuid.uuid4().hex[:12]}")
    with pytest.raises(pcq.SerializationError, match=r"'Point'.*never pickle"):
        q.put(Point(1, 2))
    with pytest.raises(pcq.SerializationError, match="'set'"):
        q.put([1, {2}])
    assert q.qsize() == 0


def test_redis_queue_needs_a_name(redis_url: str) -> None:
    with pytest.raises(pcq.ConfigError, match="name="):
        pcq.JoinableQueue(url=redis_url)


# --------------------------------------------------------------------------- misuse


def test_task_done_more_times_than_items_got_is_a_value_error(make: Make) -> None:
    q = make()
    with pytest.raises(ValueError, match="called too many times"):
        q.task_done()
    q.put(1)
    q.put(2)
    q.get(timeout=5)
    q.task_done()
    with pytest.raises(ValueError, match="called too many times"):
        q.task_done()  # item 2 was put, not got


def test_use_after_close_is_a_value_error_but_task_done_still_works(make: Make) -> None:
    q = make(4)
    q.put(1)
    q.get(timeout=5)
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    q.close()
    q.close()  # idempotent, as in the standard library
    for use in (lambda: q.put(2), lambda: q.put_nowait(2), q.get, q.get_nowait):
        with pytest.raises(ValueError, match="is closed"):
            use()
    q.task_done()
    q.join()
    q.join_thread()
    q.cancel_join_thread()


# --------------------------------------------------------------------------- consumers


def get_and_return(q: pcq.JoinableQueue, how: str) -> None:
    """The classic consumer's end: it got its None and breaks without task_done
    (or its run() raises after get())."""
    assert q.get(timeout=10) is None
    if how == "raises":
        raise RuntimeError("a consumer that raises after get()")


def get_and_die(q: pcq.JoinableQueue) -> None:
    q.get(timeout=10)
    os.kill(os.getpid(), signal.SIGKILL)  # between get() and task_done()


@pytest.mark.parametrize("how", ["returns", "raises"])
def test_a_consumer_that_ends_without_task_done_consumed_its_item(make: Make, how: str) -> None:
    # Given a consumer that gets None and ends normally without task_done
    q = make()
    q.put(None)
    child = multiprocessing.get_context("fork").Process(target=get_and_return, args=(q, how))
    child.start()
    child.join(10)
    assert child.exitcode == (0 if how == "returns" else 1)
    # Then, as with the standard library, it is not handed out again; unlike
    # the standard library's, join() does not wait for it for ever
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    joined = threading.Thread(target=q.join, daemon=True)
    joined.start()
    joined.join(10)
    assert not joined.is_alive()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_consumer_killed_between_get_and_task_done_loses_nothing(
    make: Make, method: str
) -> None:
    # Given a child (forked, or spawned: the queue travels pickled) that gets an
    # item and is SIGKILLed before task_done
    q = make()
    q.put(("the", "item"))
    child = multiprocessing.get_context(method).Process(target=get_and_die, args=(q,))
    child.start()
    child.join(20)
    assert child.exitcode == -signal.SIGKILL
    # Then the item comes back to another consumer, and join() ends once it is done
    assert q.get(timeout=10) == ("the", "item")
    q.task_done()
    q.join()


def test_task_done_does_not_wait_behind_another_threads_get(make: Make) -> None:
    # Given a thread that got an item and another thread of the same process
    # waiting in get() on the now empty queue
    q = make()
    q.put("work")
    assert q.get(timeout=5) == "work"
    waiting = threading.Thread(target=lambda: q.get(timeout=20), daemon=True)
    waiting.start()
    # When the first marks its item done, then join() returns at once
    done = threading.Thread(target=lambda: (q.task_done(), q.join()), daemon=True)
    done.start()
    done.join(5)
    assert not done.is_alive()
    q.put("wake the waiting thread")
    waiting.join(10)


# --------------------------------------------------------------------------- Redis by name


def consume_by_name(url: str, name: str, count: int) -> None:
    """A process that was never handed the queue: it opens it by name."""
    q = pcq.JoinableQueue(url=url, name=name)
    for _ in range(count):
        q.get(timeout=10)
        q.task_done()


def test_processes_that_open_a_redis_queue_by_name_share_it(redis_url: str) -> None:
    # Given a queue on Redis and a process (spawned, sharing nothing) that opens
    # the same name, as a process on another host would
    name = f"jq-{uuid.uuid4().hex[:12]}"
    q = pcq.JoinableQueue(4, url=redis_url, name=name)
    other = multiprocessing.get_context("spawn").Process(
        target=consume_by_name, args=(redis_url, name, 10))
    other.start()
    # When this one puts 10 items (through maxsize 4), join() waits for the other's task_done
    for i in range(10):
        q.put(i)
    q.join()
    other.join(20)
    assert other.exitcode == 0
    assert q.empty()


def test_a_queue_pickles_as_what_it_needs_to_reconnect(make: Make) -> None:
    q = make(3)
    copy = pickle.loads(pickle.dumps(q))
    copy.put("through the copy")
    assert q.get(timeout=5) == "through the copy"
    assert copy.qsize() == 0 and not copy.full()
    assert repr(copy) == repr(q)
    state: Any = q.__getstate__()
    assert set(state) == {"maxsize", "queue", "codec"}


def test_what_others_put_on_a_redis_queue(redis_url: str) -> None:
    # Given a JoinableQueue on Redis and pcq's own tools on the same name: a
    # plain msgpack value (as `pcq produce` puts), a body that claims to hold
    # tuples but is garbage, and a `pcq close`
    name = f"jq-{uuid.uuid4().hex[:12]}"
    q = pcq.JoinableQueue(url=redis_url, name=name)
    other = pcq.open_queue(url=redis_url, name=name)
    other.put({"plain": [1, 2]})
    other.put(msgpack.ExtType(joinable_items.WITH_TUPLES, b"\xc1"))
    # Then the plain value is an item, the garbage is dead-lettered with the reason
    assert q.get(timeout=5) == {"plain": [1, 2]}
    q.task_done()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    [letter] = other.dead_letters()
    assert "not a JoinableQueue item" in letter["error"]
    # And a closed queue is only empty to get(); the next put opens it again
    other.close()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)
    q.put(("after", "close"))
    assert q.get(timeout=5) == ("after", "close")
