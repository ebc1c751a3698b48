"""Real redis-servers for the integration tests, started on free loopback ports.

``redis_url``: the session's shared server (tests/conftest.py; tests keep apart
by using a fresh queue name each).  ``redis_server``: a private server with appendonly on,
for tests that restart or kill it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers_cli import kill_started
from redis_server import RedisServer


@pytest.fixture(autouse=True)
def no_pcq_left_behind() -> Iterator[None]:
    """Whatever a test started with start_pcq is gone when it ends, pass or fail."""
    yield
    kill_started()


@pytest.fixture
def redis_url(shared_redis: RedisServer) -> str:
    return shared_redis.url


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        server.cleanup()
