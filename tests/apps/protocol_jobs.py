"""Handlers for tests/integration/test_redis_protocol.py, addressed as
``tests/apps/protocol_jobs.py:NAME``.

``JOBS_OUT`` is a directory: a task that starts appends a JSON line to
``OUT/<pid>.started``, a task that finishes to ``OUT/<pid>.log`` (the format of
tests/apps/jobs.py, so ``handled`` reads both).  A task waits while the file
``OUT/hold-<task>`` exists: the test holds a task in its handler and lets it go.
"""

import json
import os
import time

#: Longest a held task waits for its hold file to go (a test that forgets it).
HOLD_LIMIT = 60.0


def _append(suffix, item):
    with open(os.path.join(os.environ["JOBS_OUT"], f"{os.getpid()}.{suffix}"), "a") as f:
        f.write(json.dumps(item) + "\n")


def handle_held(item):
    """Record the start, wait while ``OUT/hold-<item>`` exists, record the end."""
    _append("started", item)
    hold = os.path.join(os.environ["JOBS_OUT"], f"hold-{item}")
    deadline = time.monotonic() + HOLD_LIMIT
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.01)
    _append("log", item)


def started(out):
    """Every task that started under ``out`` (duplicates kept)."""
    items = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".started"):
            with open(os.path.join(out, name)) as f:
                items.extend(json.loads(line) for line in f)
    return items


def produce_one_dies():
    """Every producer process yields tasks 0 .. JOBS_N-1; the first to start
    SIGKILLs itself after its first task instead (a producer killed mid-run)."""
    n = int(os.environ.get("JOBS_N", "10"))
    try:
        fd = os.open(os.path.join(os.environ["JOBS_OUT"], "killed-producer"),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield from range(n)
        return
    os.close(fd)
    yield 0
    time.sleep(0.2)  # the first task is put (puts are batched)
    os.kill(os.getpid(), 9)


def double(item):
    """A first stage: one output per task."""
    return 2 * item
