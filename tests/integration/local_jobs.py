"""Producers and handlers for the local-backend integration tests.

Used as ``tests/integration/local_jobs.py:NAME`` from the CLI and imported by
the API tests.  Settings come from the environment (the CLI has no way to pass
arguments to them):

``LJ_OUT``    a directory; every handled task is appended, one JSON line, to
              ``OUT/handled-<pid>.log``; other events go to files named below
``LJ_N``      tasks per producer (default 20)
``LJ_SLEEP``  seconds every handler call sleeps (default 0)

A task is ``[producer pid, n]``, so the tasks of several producers differ.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any


def env(out: Path, **settings: str) -> dict[str, str]:
    """The environment of a `pcq` process running these jobs: LJ_OUT and settings."""
    return {**os.environ, "LJ_OUT": str(out), **settings}


def _out() -> Path:
    return Path(os.environ["LJ_OUT"])


def _n() -> int:
    return int(os.environ.get("LJ_N", "20"))


def _append(name: str, value: Any) -> None:
    with open(_out() / name, "a") as f:
        f.write(json.dumps(value) + "\n")


def produce() -> Any:
    """``LJ_N`` tasks ``[pid, n]``; records ``producer-<pid>.log`` when done."""
    pid = os.getpid()
    for n in range(_n()):
        yield [pid, n]
    _append(f"producer-{pid}.log", time.monotonic())


def produce_numbers() -> Any:
    """``LJ_N`` tasks ``0 .. N-1`` (one producer)."""
    yield from range(_n())


def produce_forever() -> Any:
    n = 0
    while True:
        yield n
        n += 1


def produce_unencodable() -> Any:
    yield 1
    yield 2
    yield object()
    yield 3


def handle(item: Any) -> None:
    delay = float(os.environ.get("LJ_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    _append(f"handled-{os.getpid()}.log", item)


def handle_logged(item: Any) -> None:
    """Record ``started-<pid>.log`` before sleeping and ``handled`` after: a test
    can tell a task that was cut short from one that finished."""
    _append(f"started-{os.getpid()}.log", item)
    handle(item)


def handle_failing(item: int) -> None:
    """Every task divisible by 5 fails, every time."""
    if item % 5 == 0:
        raise ValueError(f"unlucky {item}")
    handle(item)


def handle_gated_last_fails_once(item: int) -> None:
    """Task 0 waits for the file ``go`` (so a test can close the queue while
    this consumer is attached and the other tasks are still ready); the last
    task (``LJ_N - 1``) fails the first time; every task is recorded."""
    if item == 0:
        deadline = time.monotonic() + 30
        while not (_out() / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    if item == _n() - 1:
        handle_fails_once(item)
    else:
        _append(f"handled-{os.getpid()}.log", item)


def handle_fails_once(item: Any) -> None:
    """Raises the first time a task is handled (a marker file per task), then
    records it."""
    try:
        os.close(os.open(_out() / f"failed-{item}", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        _append(f"handled-{os.getpid()}.log", item)
        return
    raise RuntimeError(f"task {item} fails once")


def handle_stuck_once(item: int) -> None:
    """Task 0 hangs the first time it is handled (recording the pid of its
    consumer in ``victim``), so that a test can kill that consumer."""
    if item == 0:
        try:
            fd = os.open(_out() / "victim", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(60)
    handle(item)


def handle_slow_tasks(item: int) -> None:
    """Task 0 always runs 30 s; task 1 runs 30 s the first time only."""
    attempts = _out() / f"attempt-{item}"
    with open(attempts, "a") as f:
        f.write("x")
    if item == 0 or (item == 1 and attempts.stat().st_size == 1):
        time.sleep(30)
    handle(item)


def victim(out: Path) -> int | None:
    """The pid that ``handle_stuck_once`` recorded, once it has."""
    try:
        return int((out / "victim").read_text())
    except (FileNotFoundError, ValueError):  # not yet, or not yet written
        return None


def handled(out: Path) -> list[Any]:
    """Every task recorded under ``out`` (duplicates kept)."""
    return _lines(out, "handled-")


def started(out: Path) -> list[Any]:
    return _lines(out, "started-")


def handled_by(out: Path) -> Counter[int]:
    """How many tasks each consumer pid handled."""
    return Counter(
        {int(p.stem.split("-")[1]): len(p.read_text().splitlines()) for p in out.glob("handled-*")}
    )


def _lines(out: Path, prefix: str) -> list[Any]:
    items: list[Any] = []
    for path in sorted(out.glob(f"{prefix}*.log")):
        items += [json.loads(line) for line in path.read_text().splitlines()]
    return items


def as_tuples(items: list[Any]) -> Counter[Any]:
    """A multiset of tasks (JSON turns tuples into lists)."""
    return Counter(tuple(x) if isinstance(x, list) else x for x in items)


def produce_then_die() -> Any:
    """Five tasks, then the producer process is SIGKILLed (a crash, the OOM killer)."""
    yield from range(5)
    time.sleep(0.2)  # what was put reaches the queue
    os.kill(os.getpid(), signal.SIGKILL)


def produce_paced() -> Any:
    """``LJ_N`` tasks ``0 .. N-1`` with a 1 ms pause every 20, recording
    ``producing-<pid>.log`` first: a producer a test can kill mid-stream."""
    _append(f"producing-{os.getpid()}.log", time.monotonic())
    for n in range(_n()):
        if n % 20 == 0:
            time.sleep(0.001)
        yield n


def produce_after_a_pause() -> Any:
    """``LJ_N`` tasks after ``LJ_PAUSE`` seconds (consumers wait idle meanwhile)."""
    time.sleep(float(os.environ.get("LJ_PAUSE", "1")))
    yield from range(_n())


def handle_poison(item: int) -> None:
    """Task ``LJ_POISON`` kills every consumer that takes it (a segfault, the
    OOM killer); the others are handled."""
    if item == int(os.environ.get("LJ_POISON", "13")):
        os._exit(3)
    handle(item)


def handle_stop_at(item: int) -> None:
    """Task ``LJ_STOP_AT`` asks its own consumer to stop (SIGTERM), once: the
    consumer hands the rest of its lease back."""
    if item == int(os.environ.get("LJ_STOP_AT", "500")):
        try:
            os.close(os.open(_out() / "stopped", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGTERM)
    handle(item)


def consumers(out: Path) -> set[int]:
    """The pids of the consumers that handled something."""
    return {int(p.stem.split("-")[1]) for p in out.glob("handled-*.log")}


def producers(out: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in out.glob("producing-*.log")}
