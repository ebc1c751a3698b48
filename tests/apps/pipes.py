"""Stages for the pipeline tests, addressed as ``tests/apps/pipes.py:NAME``.

``produce`` yields 0 .. PIPES_N-1; ``double`` (a plain function: one output)
doubles; ``spread`` (a generator) drops multiples of 6 and fans the others out
to two outputs; ``record`` (the sink) appends its item to ``PIPES_OUT/sink-<pid>``.
Every stage handler first notes its pid in ``PIPES_OUT/pids/<stage>-<pid>`` so
that a test can find, and kill, the workers of one stage.  ``PIPES_SLEEP`` slows
every handler down (seconds per task).
"""

import json
import os
import time
from collections import Counter
from pathlib import Path

_noted = set()


def _note(stage):
    out = os.environ.get("PIPES_OUT")
    if out and (stage, os.getpid()) not in _noted:
        _noted.add((stage, os.getpid()))
        pids = Path(out) / "pids"
        pids.mkdir(exist_ok=True)
        (pids / f"{stage}-{os.getpid()}").touch()
    delay = float(os.environ.get("PIPES_SLEEP", "0"))
    if delay:
        time.sleep(delay)


def produce():
    yield from range(int(os.environ.get("PIPES_N", "100")))


def double(x):
    _note("double")
    return 2 * x


def spread(x):
    _note("spread")
    if x % 6 == 0:
        return
    yield [x, 0]
    yield [x, 1]


def record(pair):
    _note("record")
    with open(os.path.join(os.environ["PIPES_OUT"], f"sink-{os.getpid()}"), "a") as f:
        f.write(json.dumps(pair) + "\n")


def expected(n):
    """What ``record`` must see for PIPES_N = n, as a Counter."""
    return Counter((2 * x, k) for x in range(n) if (2 * x) % 6 for k in (0, 1))


def recorded(out):
    """What ``record`` saw, as a Counter of (value, k)."""
    seen = Counter()
    for path in Path(out).glob("sink-*"):
        for line in path.read_text().splitlines():
            value, k = json.loads(line)
            seen[(value, k)] += 1
    return seen


def stage_pids(out, stage):
    """The pids of the processes that ran ``stage``'s handler so far."""
    pids = Path(out) / "pids"
    if not pids.exists():
        return []
    return [int(p.name.rsplit("-", 1)[1]) for p in pids.glob(f"{stage}-*")]


def picky(x):
    """A stage that fails on 8 (16 after ``double``) and passes the rest on."""
    if x == 16:
        raise ValueError("sixteen is unlucky")
    return x


def _span(stage, began):
    """Note that a task of ``stage`` ran from ``began`` to now (PIPES_OUT/spans-...)."""
    path = os.path.join(os.environ["PIPES_OUT"], f"spans-{stage}-{os.getpid()}")
    with open(path, "a") as f:
        f.write(f"{began} {time.time()}\n")


def slow_spread(x):
    """``spread`` that first waits PIPES_HOLD seconds (for --concurrency)."""
    _note("slow_spread")
    began = time.time()
    time.sleep(float(os.environ.get("PIPES_HOLD", "0.05")))
    _span("slow_spread", began)
    yield from spread(x)


async def apass(x):
    """An async stage that waits PIPES_HOLD seconds and passes ``x`` on."""
    import asyncio

    _note("apass")
    began = time.time()
    await asyncio.sleep(float(os.environ.get("PIPES_HOLD", "0.05")))
    _span("apass", began)
    return x


def most_at_once(out, stage):
    """The most tasks of ``stage`` one process ran at the same moment."""
    best = 0
    for path in Path(out).glob(f"spans-{stage}-*"):
        edges = []
        for line in path.read_text().splitlines():
            began, ended = map(float, line.split())
            edges += [(began, 1), (ended, -1)]
        running = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
            running += step
            best = max(best, running)
    return best
