"""Small helpers shared by the tests: wait on a condition, look at processes.

Tests wait on conditions, never on fixed sleeps: ``wait_for(predicate)`` polls
until the predicate holds and fails the test with ``message`` if it never does.
Processes are read from ``/proc`` (Linux), so no third-party package is needed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pcq.backends.base import Lease, Queue

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, message: str = "", interval: float = 0.01
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.
    Raises AssertionError (with ``message``) if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(")") + 2 :].split()


def processes() -> dict[int, tuple[str, int, int]]:
    """Every process: pid -> (state, ppid, session)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) is not None:
            out[int(name)] = (fields[0], int(fields[1]), int(fields[3]))
    return out


def children_of(pid: int) -> dict[int, str]:
    """The children of ``pid`` (zombies included): pid -> state ('Z' for a zombie)."""
    return {p: state for p, (state, ppid, _) in processes().items() if ppid == pid}


def session_members(sid: int, zombies: bool = True) -> dict[int, str]:
    """The processes of session ``sid``: pid -> state.  ``zombies=False`` leaves
    out processes that exited but were not reaped (their parent is gone)."""
    return {
        p: state
        for p, (state, _, session) in processes().items()
        if session == sid and (zombies or state != "Z")
    }


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc`` — started in a session of its own — and return what it
    printed.  Fails the test if a process of its session outlived it."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert session_members(proc.pid) == {}, f"processes outlived {proc.args}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def open_fds() -> list[int]:
    """The file descriptors open in this process."""
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def take_lease(queue: Queue, timeout: float = 5.0) -> Lease:
    """The next lease that holds something — tasks, an undecodable message or a
    sentinel.  Empty leases (a stale sentinel that was dropped) are acknowledged
    and skipped.  Fails the test if nothing comes within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        lease = queue.take(1, timeout=max(0.0, left))
        if lease is not None and (lease.batches or lease.bad or lease.sentinel):
            return lease
        if lease is not None:
            queue.ack(lease)
        if left <= 0:
            raise AssertionError(f"no task or sentinel within {timeout} s")


def drain(queue: Queue, timeout: float = 5.0) -> list[Any]:
    """Take and acknowledge tasks until this consumer's sentinel; the bodies in
    the order they were taken."""
    bodies: list[Any] = []
    while True:
        lease = take_lease(queue, timeout)
        bodies.extend(env.body for env in lease.envelopes())
        queue.ack(lease)
        if lease.sentinel is not None:
            return bodies


def take_bodies(queue: Queue, count: int, timeout: float = 5.0) -> list[Any]:
    """Take and acknowledge leases until at least ``count`` tasks came; their bodies."""
    bodies: list[Any] = []
    while len(bodies) < count:
        lease = take_lease(queue, timeout)
        bodies.extend(env.body for env in lease.envelopes())
        queue.ack(lease)
    return bodies
