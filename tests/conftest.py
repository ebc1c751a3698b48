"""Shared test configuration.

``tests/`` has no ``__init__.py``: pytest puts this directory on ``sys.path``
when it loads this file, so tests import their helpers directly
(``from helpers import wait_for``).

``shared_redis`` is one real redis-server (a free loopback port, a private temp
dir) for the whole session, started on first use; tests keep apart by using
queue names of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_server import RedisServer


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()
