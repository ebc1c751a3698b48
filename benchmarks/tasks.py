"""The work every system runs: the producers' iterables and the handlers.

All of it is module-level (pcq forks its children, and a spawn start method
would need to import these by name), takes its parameters through
``functools.partial``, and imports nothing heavy: whatever a child imports is
counted in its RSS and start-up.

Each producer writes the ``first_put`` mark (see :mod:`benchmarks.probe`) just
before it yields its first item, that is right before the first put.
"""

from __future__ import annotations

import itertools
import os
import select
import statistics
import struct
import time
from collections.abc import Iterator

from benchmarks import probe

# ---------------------------------------------------------------- noop, memory


def ints(n: int) -> Iterator[int]:
    """``0 .. n-1``: small ints, the cheapest task a queue can carry."""
    probe.mark("first_put")
    yield from range(n)


def noop(item: object) -> None:
    """The handler that does nothing."""


def ints_from_env() -> range:
    """``0 .. PCQ_BENCH_N-1``, for a ``pcq produce`` started as a command (the
    scaling benchmark's "hosts" rows), which takes no arguments."""
    return range(int(os.environ["PCQ_BENCH_N"]))


# ---------------------------------------------------------------- cpu


def same(value: int, n: int) -> Iterator[int]:
    """``value``, ``n`` times (the cpu task's size)."""
    probe.mark("first_put")
    yield from itertools.repeat(value, n)


def spin(k: int) -> int:
    """Pure-Python work that holds the GIL for ``k`` loop turns."""
    x = 0
    for i in range(k):
        x ^= i * 7
    return x


def spin_counted(k: int) -> int:
    """``spin(k)``, adding up the calls and their wall time in this process (its
    exit line shows them: ``calls``, ``busy_s``)."""
    started = time.perf_counter()
    x = spin(k)
    _tally[0] += 1
    _tally[1] += time.perf_counter() - started
    probe.note(calls=_tally[0], busy_s=_tally[1])
    return x


_tally = [0, 0.0]


def time_spin(k: int, calls: int = 5) -> float:
    """Median seconds of one ``spin(k)`` in this process."""
    return statistics.median(spin_times(k, calls))


def spin_times(k: int, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        spin(k)
        times.append(time.perf_counter() - t)
    return times


def calibrate_spin(target_s: float) -> int:
    """The ``k`` for which ``spin(k)`` takes about ``target_s`` here."""
    k = 100_000
    for _ in range(3):
        k = max(1000, int(k * target_s / time_spin(k)))
    return k


# ---------------------------------------------------------------- latency

_REPLY = struct.Struct("dd")  # (sent_at, delay): sent_at matches a reply to its task


def paced(
    count: int, warmup: int, reply_fd: int, spacing: float, give_up: float = 10.0
) -> Iterator[float]:
    """Latency producer: yield ``time.monotonic()``, wait until a handler replies
    through ``reply_fd``, sleep ``spacing`` seconds, repeat.

    The pause comes *after* the reply, so the queue is idle when the next task
    is put, and the iterable is visibly slow: pcq's ``put_many`` holds back an
    item that arrives less than 1 ms after its previous put returned (it waits
    for a batch to fill), which would leave a reply-waiting producer stuck.

    The delays of the ``count`` tasks after ``warmup`` go to the probe file as
    one ``delays`` line (None for a task with no reply within ``give_up`` s).
    """
    time.sleep(0.2)  # let every consumer reach its idle wait
    probe.mark("first_put")
    delays: list[float | None] = []
    for i in range(warmup + count):
        sent_at = time.monotonic()
        yield sent_at
        delay = _await_reply(reply_fd, sent_at, give_up)
        if i >= warmup:
            delays.append(delay)
        time.sleep(spacing)
    probe.write({"event": "delays", "delays": delays})


def _await_reply(fd: int, sent_at: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        their_sent_at, delay = _REPLY.unpack(os.read(fd, _REPLY.size))
        if their_sent_at == sent_at:  # else: a late reply to an earlier task
            return float(delay)
    return None


def reply_delay(reply_fd: int, sent_at: float) -> None:
    """Latency handler: report put-to-handler delay of the task (first thing it does)."""
    os.write(reply_fd, _REPLY.pack(sent_at, time.monotonic() - sent_at))
