"""The backends the conformance suite runs against.

Every test in ``tests/conformance`` takes the ``make_queue`` fixture, a
:class:`QueueFactory`: ``make_queue(maxsize=0) -> Queue`` opens a fresh queue
with a name unique to the test, and everything it opened is disposed of when
the test ends.  The suite runs once per entry of :data:`BACKENDS`.

The backends: ``local``; ``redis-fake`` (fakeredis with Lua, in this process);
``redis-real`` (the session's real redis-server).  To add one, write a
:class:`Backend` subclass and list it in :data:`BACKENDS`.

A backend whose queues cannot be shared with a forked child process sets
``multiprocess = False``: the tests marked ``@pytest.mark.multiprocess`` (a
consumer process that is SIGKILLed, several consumer processes) are then not
generated for it at all — they are neither run nor reported as skipped.
Likewise ``idle_is_new = False`` leaves out the tests marked
``@pytest.mark.idle_is_new`` (a consumer attaching to a finished run's queue
waits for the next producer), for a backend that does not follow that rule yet.
``prepare(request)`` can pull in fixtures (a redis-server), ``cleanup(queue)``
can delete what a queue left on a server.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator

import pytest
from fake_redis import FakeRedis
from redis_server import RedisServer

from pcq.backends.base import Queue
from pcq.backends.local import LocalQueue
from pcq.backends.redis import RedisQueue


class Backend:
    """How the suite opens queues of one backend."""

    name: str = ""
    #: True when a queue can be handed to a forked child process and used there.
    multiprocess: bool = True
    #: True when a consumer attaching to an idle queue waits for the next run.
    idle_is_new: bool = True

    def prepare(self, request: pytest.FixtureRequest) -> None:
        """Called once per test before the first queue is opened."""

    def open(self, name: str, maxsize: int) -> Queue:
        raise NotImplementedError

    def handle(self, queue: Queue) -> Queue:
        """A second handle on ``queue``, for a second consumer in this process
        (each handle registers as a consumer of its own).  By default the queue
        is opened again by name."""
        return self.open(queue.name, queue.maxsize)

    def cleanup(self, queue: Queue) -> None:
        """Free ``queue`` (and a handle on it) at the end of the test."""
        queue.dispose()


class LocalBackend(Backend):
    name = "local"

    def open(self, name: str, maxsize: int) -> Queue:
        return LocalQueue(name, maxsize=maxsize)

    def handle(self, queue: Queue) -> Queue:
        # A local queue exists only through the object that created it: a copy
        # shares its shared state and starts with fresh per-process state, as
        # the queue does in a child process.
        return copy.copy(queue)


class FakeRedisBackend(Backend):
    """Redis semantics in this process's memory (fakeredis with Lua): fast, but
    a forked child cannot reach it."""

    name = "redis-fake"
    multiprocess = False

    def prepare(self, request: pytest.FixtureRequest) -> None:
        self.client = FakeRedis()

    def open(self, name: str, maxsize: int) -> Queue:
        return RedisQueue(name, maxsize=maxsize, client=self.client, heartbeat_ttl=1.0)


class RealRedisBackend(Backend):
    """The session's real redis-server."""

    name = "redis-real"

    def prepare(self, request: pytest.FixtureRequest) -> None:
        server: RedisServer = request.getfixturevalue("shared_redis")
        self.url = server.url

    def open(self, name: str, maxsize: int) -> Queue:
        return RedisQueue(name, maxsize=maxsize, url=self.url, heartbeat_ttl=1.0)

    def cleanup(self, queue: Queue) -> None:
        queue.purge()
        queue.dispose()


#: One entry per backend; the suite runs once for each.
BACKENDS: list[Backend] = [LocalBackend(), FakeRedisBackend(), RealRedisBackend()]


class QueueFactory:
    """``make_queue(maxsize=0) -> Queue``: fresh queues of one backend for one test."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.multiprocess = backend.multiprocess
        self._opened: list[Queue] = []
        self._prefix = f"conformance-{uuid.uuid4().hex[:10]}"

    def __call__(self, maxsize: int = 0) -> Queue:
        queue = self.backend.open(f"{self._prefix}-{len(self._opened)}", maxsize)
        self._opened.append(queue)
        return queue

    def sibling(self, queue: Queue, maxsize: int = 0) -> Queue:
        """A fresh queue on ``queue``'s server (a stage's target queue)."""
        other = queue.sibling(f"{queue.name}-next-{len(self._opened)}", maxsize=maxsize)
        self._opened.append(other)
        return other

    def handle(self, queue: Queue) -> Queue:
        """Another handle on ``queue`` (a second consumer in this process)."""
        other = self.backend.handle(queue)
        self._opened.append(other)
        return other

    def cleanup(self) -> None:
        for queue in reversed(self._opened):  # handles before the queues they share
            self.backend.cleanup(queue)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "multiprocess: needs a queue shared with forked child processes "
        "(generated only for backends with Backend.multiprocess)",
    )
    config.addinivalue_line(
        "markers",
        "idle_is_new: a consumer attaching to an idle queue waits for the next run "
        "(generated only for backends with Backend.idle_is_new)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    needs_processes = metafunc.definition.get_closest_marker("multiprocess") is not None
    needs_idle = metafunc.definition.get_closest_marker("idle_is_new") is not None
    chosen = [
        b
        for b in BACKENDS
        if (b.multiprocess or not needs_processes) and (b.idle_is_new or not needs_idle)
    ]
    metafunc.parametrize("backend", chosen, ids=[b.name for b in chosen], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    chosen: Backend = request.param
    chosen.prepare(request)
    return chosen


@pytest.fixture
def make_queue(backend: Backend) -> Iterator[QueueFactory]:
    factory = QueueFactory(backend)
    yield factory
    factory.cleanup()
