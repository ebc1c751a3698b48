"""CPython's own queue tests, unchanged, run against pcq.JoinableQueue.

``_TestQueue`` of ``test._test_multiprocessing`` (shipped with every CPython)
is what CPython runs against ``multiprocessing.Queue`` and ``JoinableQueue``.
Its public-API tests — ``test_put``, ``test_get``, ``test_fork``, ``test_qsize``,
``test_task_done`` — run here as they are, built the way that module's own
``install_tests_in_module_dict`` builds them (``class Temp(base, Mixin,
unittest.TestCase)``), with a ``ProcessesMixin`` whose ``Queue`` and
``JoinableQueue`` are ``pcq.JoinableQueue``: on the local backend and on a real
redis-server, with children started by fork and by forkserver (Python 3.14's
default on Linux; it pickles the queue as spawn does, and test_joinable.py
spawns too).  Its other tests build ``multiprocessing.Queue`` themselves
(or test locks): they do not test pcq, and are switched off here.
"""

from __future__ import annotations

import multiprocessing
import unittest
import uuid
from typing import Any

import pytest
from test import _test_multiprocessing as stdlib

import pcq

PUBLIC_API_TESTS = ("test_put", "test_get", "test_fork", "test_qsize", "test_task_done")


def _mixin(method: str, queue: Any) -> type:
    """The stdlib's ProcessesMixin with children started by ``method`` and
    ``queue`` as both queue factories."""
    ctx = multiprocessing.get_context(method)
    return type(f"{method}Mixin", (stdlib.ProcessesMixin,), {
        "Process": ctx.Process,
        "Event": staticmethod(ctx.Event),  # a fork-made Event cannot go to a spawned child
        "Queue": queue,
        "JoinableQueue": queue,
    })


class RedisQueues:
    """Queue factory on the session's redis-server (set by the fixture below):
    a fresh queue name for each queue a test makes."""

    url = ""

    @classmethod
    def make(cls, maxsize: int = 0) -> pcq.JoinableQueue:
        return pcq.JoinableQueue(maxsize, url=cls.url, name=f"stdlib-{uuid.uuid4().hex[:12]}")


def _install(prefix: str, queue: Any, methods: tuple[str, ...]) -> None:
    """One TestCase class per start method, as install_tests_in_module_dict makes them."""
    off = {name: None for name in dir(stdlib._TestQueue)
           if name.startswith("test_") and name not in PUBLIC_API_TESTS}
    for method in methods:
        name = f"Test{prefix}{method.capitalize()}Queue"
        cls = type(name, (stdlib._TestQueue, _mixin(method, queue), unittest.TestCase), off)
        cls.__module__ = __name__  # children under spawn find it here, by name
        globals()[name] = cls


# As the stdlib's own forkserver tests do: the server imports this module once,
# not every child (a child must find these classes to run their methods).
multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])

_install("Local", staticmethod(pcq.JoinableQueue), ("fork", "forkserver"))
_install("Redis", RedisQueues.make, ("fork", "forkserver"))


@pytest.fixture(autouse=True)
def _redis_for_redis_classes(request: pytest.FixtureRequest) -> None:
    if request.cls is not None and request.cls.Queue == RedisQueues.make:
        RedisQueues.url = request.getfixturevalue("redis_url")


def test_every_public_api_test_runs() -> None:
    """The stdlib still has each of these tests, and each class runs exactly them."""
    loader = unittest.TestLoader()
    classes = [v for k, v in globals().items() if k.startswith("Test") and isinstance(v, type)]
    assert len(classes) == 4
    for cls in classes:
        assert sorted(loader.getTestCaseNames(cls)) == sorted(PUBLIC_API_TESTS)
