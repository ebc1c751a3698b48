"""The workloads: what each one runs, on which systems, at what size.

noop
    N small ints (0..N-1), the handler does nothing; one producer process and W
    consumer processes run concurrently.  Window: the producer's first put to
    the last consumer's exit (it exits after acknowledging its last task and
    taking its sentinel).  Reported as tasks/s = N / window, so runs with
    different N compare; N is chosen per system so each run lasts about a
    second or more here (slow baselines get smaller N).
cpu
    ``CPU_TASKS`` tasks of ~20 ms pure-Python work (``tasks.spin``), W consumers.
    Efficiency = CPU_TASKS x t1 / (W x window), t1 = the median of 10 calls of
    one task in the trial's parent process, 5 just before the job and 5 right
    after it (the machine is shared: its speed drifts).  Also reported:
    utilisation = CPU seconds of the consumers / (W x window), and how many
    tasks each consumer ran.
latency
    On an idle queue with consumers waiting, one task at a time: the body is
    ``time.monotonic()`` at put (CLOCK_MONOTONIC, system-wide), the handler's
    first act is to send ``now - body`` back through a pipe; the producer waits
    for that reply, sleeps ``LATENCY_SPACING``, and puts the next task.  Median
    and p99 over ``LATENCY_TASKS`` tasks (after ``LATENCY_WARMUP`` not counted).
memory
    noop with a producer yielding ``MEMORY_N`` items, maxsize 1000: the peak
    RSS (VmHWM, read by each process right before it exits) of the producer and
    consumer processes, at 10,000,000 and at 1,000,000 items.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from benchmarks import tasks

WORKERS = 2
CPU_TASKS = 400
CPU_TASK_SECONDS = 0.020
LATENCY_TASKS = 1000
LATENCY_WARMUP = 20
LATENCY_SPACING = 0.002
#: A latency task with no reply after this long counts as lost (and fails the run).
LATENCY_GIVE_UP = 10.0
MEMORY_N = (10_000_000, 1_000_000)
#: --quick divides N (noop, memory), cpu tasks and latency tasks by this.
QUICK_DIVISOR = 10

#: noop N per system: about 1-3 s each on the 2-core machine of README.md.
NOOP_N = {
    "pcq-local-16": 120_000,
    "pcq-local-1000": 2_000_000,
    "pcq-redis": 1_000_000,
    "jq-16": 100_000,
    "jq-unbounded": 150_000,
    "pool-1": 50_000,
    "pool-500": 3_000_000,
    "redis-raw": 12_000,
}
#: A run that took longer than this has its N scaled down for the next
#: repetitions, to about ``RESCALE_TO_S`` (a slow system must not eat the budget).
RESCALE_ABOVE_S = 8.0
RESCALE_TO_S = 3.0

SYSTEMS_FOR = {
    "noop": list(NOOP_N),
    "cpu": ["pcq-local-16", "pcq-local-1000", "pcq-redis", "jq-16", "jq-unbounded", "redis-raw"],
    "latency": ["pcq-local-16", "pcq-local-1000", "pcq-redis", "jq-16", "jq-unbounded",
                "redis-raw"],
    "memory": ["pcq-local-1000", "pcq-redis"],
}
WORKLOADS = list(SYSTEMS_FOR)
#: Per-trial time limit (seconds); a trial past it is killed and reported as an error.
TIMEOUT_S = {"noop": 180, "cpu": 180, "latency": 180, "memory": 900}


def sizes(workload: str, system: str, quick: bool) -> list[int]:
    """The N (tasks) of one trial of ``workload`` on ``system``; memory has two."""
    div = QUICK_DIVISOR if quick else 1
    if workload == "noop":
        return [max(1000, NOOP_N[system] // div)]
    if workload == "cpu":
        return [CPU_TASKS // div]
    if workload == "latency":
        return [LATENCY_TASKS // div]
    if workload == "memory":
        return [n // div for n in MEMORY_N]
    raise ValueError(f"unknown workload {workload!r}")


@dataclass
class Job:
    """What one trial runs: the producer's iterable, the handler, and how a raw
    backend decodes a task body from bytes."""

    produce: Callable[[], Iterable[Any]]
    handle: Callable[[Any], Any]
    decode: Callable[[bytes], Any]
    reply_fd: int | None = None


def job(workload: str, n: int, spin_k: int) -> Job:
    if workload in ("noop", "memory"):
        return Job(functools.partial(tasks.ints, n), tasks.noop, int)
    if workload == "cpu":
        return Job(functools.partial(tasks.same, spin_k, n), tasks.spin_counted, int)
    if workload == "latency":
        read_fd, write_fd = os.pipe()
        return Job(
            functools.partial(tasks.paced, n, LATENCY_WARMUP, read_fd, LATENCY_SPACING,
                              LATENCY_GIVE_UP),
            functools.partial(tasks.reply_delay, write_fd),
            float,
            reply_fd=read_fd,
        )
    raise ValueError(f"unknown workload {workload!r}")
