"""Settings decided once: what a stage's consumers do, shared constants, and
small helpers every layer used to write for itself.

:class:`StageSettings` is validated when it is made, so a bad value is one
:class:`~pcq.errors.ConfigError` at the edge (the CLI, ``pcq.run``), never a
surprise deep in a child process.  The engine, the supervisor and the consume
loop take a ``StageSettings`` instead of a dozen loose parameters.
"""

from __future__ import annotations

import enum
import functools
import inspect
import multiprocessing as mp
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pcq.errors import ConfigError

T = TypeVar("T")

#: How long an idle consumer blocks in one take before it looks around again.
IDLE_WAIT = 0.25
#: How long a stopping job lets running tasks finish before it kills them.
GRACE_SECONDS = 5.0


class ExitCode(enum.IntEnum):
    """The exit codes of every ``pcq`` command."""

    OK = 0  #: every task done
    FAILED = 1  #: some tasks failed or were dead-lettered, or a producer failed
    USAGE = 2  #: usage or configuration error (a consumer's --setup that raised too)
    BACKEND_LOST = 3  #: the backend was lost mid-run, or lost the queue's data
    INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT); SIGTERM gives 143


@dataclass(frozen=True)
class StageSettings:
    """What the consumers of one stage do with each task.

    ``workers`` processes each run up to ``concurrency`` tasks at once; a task
    that raises is tried again up to ``retries`` times (backoff ``backoff`` s,
    doubling) and then dead-lettered; one that runs past ``timeout`` seconds
    counts as failed; one in flight in ``max_deliveries`` consumers that died is
    dead-lettered as poison (0: never).  ``setup`` runs once in each consumer
    process before its first task.
    """

    workers: int = 4
    concurrency: int = 1
    retries: int = 0
    timeout: float | None = None
    max_deliveries: int = 3
    backoff: float = 0.05
    setup: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, not {self.workers}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.retries < 0:
            raise ConfigError(f"retries must be 0 or more, not {self.retries}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"timeout must be more than 0 seconds, not {self.timeout}")
        if self.max_deliveries < 0:
            raise ConfigError("max_deliveries must be 0 (no limit) or more, "
                              f"not {self.max_deliveries}")
        if self.backoff < 0:
            raise ConfigError(f"backoff must be 0 or more, not {self.backoff}")


def per_stage(value: T | Sequence[T], stages: int, what: str) -> list[T]:
    """One value per stage: a single value applies to every stage, a list or
    tuple gives one per stage and must have exactly ``stages`` of them."""
    if isinstance(value, (list, tuple)):
        if len(value) != stages:
            raise ConfigError(f"{what}: give one value for all stages or one per stage "
                              f"({stages}), not {len(value)}")
        return list(value)
    return [value] * stages  # type: ignore[list-item]


def is_async_handler(fn: Any) -> bool:
    """True for an ``async def`` function, a partial of one, or an object whose
    ``__call__`` is one: the consume loop must await what it returns."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004 - a callable object's method


def fork_context() -> Any:
    """The multiprocessing context pcq starts its own processes with: ``fork`` on
    Linux (children inherit the queue object and the user's handler, which need
    not be importable), the platform's default elsewhere."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else None)
