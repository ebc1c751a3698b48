"""Handlers for the ``--concurrency`` tests, addressed as
``tests/apps/slots_jobs.py:NAME`` from the CLI.

Every handler appends JSON lines to files under ``JOBS_OUT``:
``<pid>.started`` — ``[item, start time, thread id]`` when a task starts;
``<pid>.log`` — ``[item, start, end, thread id]`` when it finished without error.
``JOBS_N`` is how many tasks ``produce`` yields.  ``SLOTS_HOLD``: seconds a
``*_held`` handler holds its task at most, released early once the file
``JOBS_OUT/go`` exists (a test creates it when it has seen what it waits for).
"""

import asyncio
import json
import os
import threading
import time


def produce():
    yield from range(int(os.environ.get("JOBS_N", "20")))


def _out(name):
    return os.path.join(os.environ["JOBS_OUT"], name)


def _append(name, record):
    with open(_out(f"{os.getpid()}.{name}"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _started(item):
    began = time.time()
    _append("started", [item, began, threading.get_ident()])
    return began


def _done(item, began):
    _append("log", [item, began, time.time(), threading.get_ident()])


def _hold_seconds():
    return float(os.environ.get("SLOTS_HOLD", "0.3"))


def _released():
    return os.path.exists(_out("go"))


def sleepy(item):
    """Hold the task SLOTS_HOLD seconds (or until released)."""
    began = _started(item)
    deadline = time.monotonic() + _hold_seconds()
    while time.monotonic() < deadline and not _released():
        time.sleep(0.01)
    _done(item, began)


async def asleepy(item):
    began = _started(item)
    deadline = time.monotonic() + _hold_seconds()
    while time.monotonic() < deadline and not _released():
        await asyncio.sleep(0.01)
    _done(item, began)


async def plain_async(item):
    """An async handler that must really run (it used to be dropped unawaited)."""
    await asyncio.sleep(0)
    _done(item, time.time())


def flaky_once(item):
    """Task 7 fails on its first attempt only; every task is recorded when it succeeds."""
    began = _started(item)
    time.sleep(0.05)
    if item == 7:
        try:
            os.close(os.open(_out("failed-7"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            raise ValueError("task 7 fails once")
    _done(item, began)


async def async_stuck(item):
    """Every fifth task waits far past any timeout; a cancellation is recorded."""
    began = _started(item)
    if item % 5 == 0:
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            _append("cancelled", item)
            raise
    _done(item, began)


async def async_blocking(item):
    """Every fifth task blocks its event loop (time.sleep in async def) past the
    timeout; the others are quick."""
    began = _started(item)
    if item % 5 == 0:
        time.sleep(float(os.environ.get("SLOTS_BLOCK", "1.5")))
    _done(item, began)


def thread_stuck(item):
    """Every fifth task sleeps far past any timeout, in its thread."""
    began = _started(item)
    if item % 5 == 0:
        time.sleep(600)
    _done(item, began)


async def async_blocks_loop(item):
    """Block the event loop for SLOTS_BLOCK seconds: the heartbeat must go on."""
    began = _started(item)
    time.sleep(float(os.environ.get("SLOTS_BLOCK", "2.5")))
    _done(item, began)


def records(out, kind="log"):
    """Every record of ``kind`` under ``out`` as (pid, record) pairs."""
    found = []
    for name in sorted(os.listdir(out)):
        pid, _, suffix = name.partition(".")
        if suffix == kind:
            with open(os.path.join(out, name)) as f:
                found.extend((int(pid), json.loads(line)) for line in f if line.strip())
    return found


def most_at_once(out):
    """The largest number of finished tasks that were running at the same moment."""
    events = []
    for _, (_item, began, ended, _thread) in records(out):
        events += [(began, 1), (ended, -1)]
    running = most = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start
        running += step
        most = max(most, running)
    return most
