"""The queues an admin command opens, and what it reads before it starts:
a shared queue (never a local one outside `pcq run`), an interrupted run's
leftovers, tasks as JSON lines on stdin, a purge's confirmation."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from pcq.backends import backend_for, open_queue
from pcq.backends.base import Queue
from pcq.cli_report import err
from pcq.errors import ConfigError
from pcq.interrupted import resume_check


def shared_queue(
    backend: str | None, url: str | None, name: str, maxsize: int = 0, **options: Any
) -> Queue:
    """A queue other processes can reach: local queues live only inside `pcq run`."""
    if backend_for(backend, url) == "local":
        raise ConfigError(
            "this command needs a shared queue: give --url redis://HOST:PORT/DB "
            "(or PCQ_URL); a local queue lives only inside `pcq run`"
        )
    return open_queue(backend, url=url, name=name, maxsize=maxsize, **options)


@contextmanager
def opened(
    backend: str | None, url: str | None, name: str, *, reading: bool = False
) -> Iterator[Queue]:
    """A shared queue for one admin command, disposed of when it is done.
    ``reading``: the command only reads, and the queue must exist (reading never
    writes: a Redis queue opened to read creates no key)."""
    only_reads = reading and backend_for(backend, url) == "redis"
    q = shared_queue(backend, url, name, **({"read_only": True} if only_reads else {}))
    try:
        if reading and not q.exists():  # a misspelled --queue would otherwise show zeros
            raise ConfigError(f"queue {name!r} does not exist on this server (nothing was "
                              "ever put in it, and no consumer or producer is attached)")
        yield q
    finally:
        q.dispose()


def leftovers_said(backend: str | None, url: str | None, name: str, resume: bool,
                    shared: bool) -> bool:
    """Say what a run will do with an interrupted run's leftovers on a shared
    queue; False when there is nothing to do (``--resume`` of a finished queue)."""
    if not shared:
        return resume_check(None, name, resume)[1]
    with opened(backend, url, name) as q:
        line, go = resume_check(q, name, resume)
    if line is not None:
        err.print(line, highlight=False, soft_wrap=True, markup=False)
    return go


def json_lines(stream: Any) -> Iterator[Any]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"stdin line {number} is not JSON ({exc.msg}); the {number - 1} lines before "
                "it were put, the queue was left open"
            ) from None


def purge_confirmed(q: Queue, name: str) -> bool:
    """Whether the person at the terminal confirms purging ``q`` while consumers
    are attached; True off a terminal (scripts) and when none is attached."""
    consumers = q.counters().consumers
    if not consumers or not sys.stdin.isatty():
        return True
    return typer.confirm(f"queue {name!r} has {consumers} consumer(s) attached; drop its "
                         "tasks, in flight included?", default=False, err=True)
