"""Producers and handlers for the integration tests, addressed as
``tests/apps/jobs.py:NAME`` from the CLI.

Settings come from the environment, so that the same functions serve every
test: ``JOBS_N`` (how many tasks), ``JOBS_OUT`` (a directory: every handled
task is appended, one JSON line, to ``OUT/<pid>.log``), ``JOBS_SLEEP`` (seconds
each handle sleeps), ``JOBS_START`` (first task number).
"""

import hashlib
import json
import os
import signal
import time


def _n():
    return int(os.environ.get("JOBS_N", "100"))


def produce():
    start = int(os.environ.get("JOBS_START", "0"))
    yield from range(start, start + _n())


def _record(item):
    out = os.environ.get("JOBS_OUT")
    if out:
        with open(os.path.join(out, f"{os.getpid()}.log"), "a") as f:
            f.write(json.dumps(item) + "\n")


def handle(item):
    delay = float(os.environ.get("JOBS_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    _record(item)


def handle_slow_first(item):
    """Record that the task started (``OUT/<pid>.started``), then sleep: the test
    kills this process mid-task."""
    out = os.environ["JOBS_OUT"]
    with open(os.path.join(out, f"{os.getpid()}.started"), "a") as f:
        f.write(json.dumps(item) + "\n")
    time.sleep(float(os.environ.get("JOBS_SLEEP", "0.2")))
    _record(item)


def handle_failing(item):
    """Every task divisible by 5 fails, every time."""
    if item % 5 == 0:
        raise ValueError(f"unlucky {item}")
    _record(item)


def handled(out):
    """Every task recorded under ``out``, as a list (duplicates kept)."""
    items = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".log"):
            with open(os.path.join(out, name)) as f:
                items.extend(json.loads(line) for line in f)
    return items


def _poison():
    return int(os.environ.get("JOBS_POISON", "-1"))


def handle_poison(item):
    """Task ``JOBS_POISON`` kills the consumer that runs it (as a segfaulting C
    extension or the OOM killer would); every other task is recorded."""
    if item == _poison():
        os._exit(1)
    _record(item)


def handle_kills_self(item):
    """Each task listed in ``JOBS_KILLERS`` (comma-separated) SIGKILLs the
    consumer that runs it; every other task takes ``JOBS_SLEEP`` seconds (so
    tasks run side by side in a consumer's slots) and is recorded."""
    if str(item) in os.environ.get("JOBS_KILLERS", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(os.environ.get("JOBS_SLEEP", "0.2")))
    _record(item)


def _busy_loop_for(seconds):
    """How many numbers ``sum(range(n))`` adds in about ``seconds``: one call into
    C that holds the GIL all along (no bytecode runs, no thread switch)."""
    n = 2_000_000
    started = time.perf_counter()
    sum(range(n))
    return max(n, int(n * seconds / max(time.perf_counter() - started, 1e-6)))


def handle_gil(item):
    """Hold the GIL for about ``JOBS_GIL_SECONDS`` in one C call, then record."""
    sum(range(_busy_loop_for(float(os.environ.get("JOBS_GIL_SECONDS", "3")))))
    _record(item)


def handle_swallow(item):
    """Task ``JOBS_POISON`` catches the TaskTimeout and goes on for
    ``JOBS_AFTER`` seconds (a handler that swallows every exception); others are
    recorded."""
    if item == _poison():
        try:
            time.sleep(60)
        except Exception:
            time.sleep(float(os.environ.get("JOBS_AFTER", "600")))
        return
    _record(item)


def handle_in_c(item):
    """Task ``JOBS_POISON`` sits for minutes in one C call that never checks for
    signals (a billion PBKDF2 rounds), so no TaskTimeout can reach it; others
    are recorded."""
    if item == _poison():
        hashlib.pbkdf2_hmac("sha256", b"pcq", b"salt", 10**9)
        return
    _record(item)


def handle_dies(item):
    """Every task kills its consumer: a crash loop."""
    os._exit(1)


def handle_kills(item):
    """The tasks listed in ``JOBS_KILL`` ("3,7") SIGKILL the consumer process
    that runs them (all its slots with it); the others sleep ``JOBS_SLEEP`` and
    are recorded."""
    if str(item) in os.environ.get("JOBS_KILL", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    handle(item)


def passthrough(item):
    """A cheap stage: hands its item on."""
    return item


def handle_timed(item):
    """Sleep ``JOBS_SLEEP``, then append [item, pid, started, ended] to
    ``OUT/<pid>.timed``: who ran each task, and when."""
    started = time.time()
    time.sleep(float(os.environ.get("JOBS_SLEEP", "0")))
    with open(os.path.join(os.environ["JOBS_OUT"], f"{os.getpid()}.timed"), "a") as f:
        f.write(json.dumps([item, os.getpid(), started, time.time()]) + "\n")


def timed(out):
    """Every [item, pid, started, ended] that handle_timed recorded under ``out``."""
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".timed"):
            with open(os.path.join(out, name)) as f:
                rows.extend(json.loads(line) for line in f)
    return rows
