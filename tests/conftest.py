"""Shared test configuration.

``tests/`` has no ``__init__.py``: pytest puts this directory on ``sys.path``
when it loads this file, so tests import their helpers directly
(``from helpers import wait_for``).

``shared_redis`` is one real redis-server (a free loopback port, a private temp
dir) for the whole session, started on first use; tests keep apart by using
queue names of their own.
"""

from __future__ import annotations

import compileall
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Compile pcq and the test apps once, before any test (in the controller,
    not in each xdist worker): the suite starts hundreds of `pcq` processes,
    and where bytecode is not written on import (PYTHONDONTWRITEBYTECODE, as in
    some CI images) each would compile every module again — about a minute of
    CPU over a run."""
    if hasattr(config, "workerinput"):
        return
    for part in ("pcq", "tests/apps", "tests/integration", "examples", "benchmarks"):
        compileall.compile_dir(ROOT / part, quiet=1, workers=1)


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()
