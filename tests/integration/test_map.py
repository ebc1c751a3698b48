"""``pcq.map`` with real worker processes, on the local backend and on a real
redis-server: every result exactly once under SIGKILLs, input order with
``ordered=True``, ``TaskFailed``, and an early ``break`` that leaves nothing
running."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import children_of, wait_for
from helpers_cli import ROOT, session_pids

import pcq

BACKENDS = ["local", "redis"]
_PIDS = Path(os.environ.get("TMPDIR", "/tmp")) / f"pcq-map-test-{os.getpid()}"


def options(backend: str, redis_url: str) -> dict[str, Any]:
    return {} if backend == "local" else {"url": redis_url}


def square_slowly(x: int) -> int:
    """Note this worker's pid (the test kills noted workers), then work a little."""
    mark = _PIDS / str(os.getpid())
    if not mark.exists():
        _PIDS.mkdir(exist_ok=True)
        mark.touch()
    time.sleep(0.0005)
    return x * x


def fails_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError("seven is right out")
    return x


def live_children() -> set[int]:
    return {pid for pid, state in children_of(os.getpid()).items() if state != "Z"}


class WorkerKiller(threading.Thread):
    """SIGKILLs a random live map worker (a child of this process that ran
    ``square_slowly``) every 150-400 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.kills = 0
        self._done = threading.Event()

    def run(self) -> None:
        rng = random.Random()
        while not self._done.wait(rng.uniform(0.15, 0.4)):
            noted = {int(p.name) for p in _PIDS.iterdir()} if _PIDS.exists() else set()
            victims = sorted(noted & live_children())
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.kills


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", BACKENDS)
# Each order with one chunk size (all four pairs took a minute of the suite).
@pytest.mark.parametrize(("ordered", "chunksize"), [(False, 1), (True, 40)],
                         ids=["unordered-1", "ordered-40"])
def test_every_result_exactly_once_while_workers_are_killed(
    backend, ordered, chunksize, redis_url
):
    # Given thousands of items and workers SIGKILLed every few hundred ms
    n = 6000
    shutil.rmtree(_PIDS, ignore_errors=True)  # pids noted by an earlier test may be reused
    before = live_children()
    killer = WorkerKiller()
    killer.start()
    try:
        # When they are mapped
        # (random kills of innocent workers are no poison: no delivery limit)
        results = list(pcq.map(square_slowly, range(n), workers=3, ordered=ordered,
                               chunksize=chunksize, max_deliveries=0,
                               **options(backend, redis_url)))
    finally:
        kills = killer.stop()
    # Then every result came exactly once (in input order when ordered)
    assert kills > 0, "the map ended before any worker was killed"
    if ordered:
        assert results == [x * x for x in range(n)]
    else:
        assert sorted(results) == [x * x for x in range(n)]
    # ... and nothing it started is left running
    assert live_children() <= before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ordered_keeps_input_order_with_an_endless_input_in_a_bounded_window(
    backend, redis_url
):
    # An endless input: only the window's worth is ever in the works
    counter = iter(range(10**12))
    got = []
    for value in pcq.map(abs, counter, workers=2, ordered=True, window=64, maxsize=16,
                         **options(backend, redis_url)):
        got.append(value)
        if len(got) == 2000:
            break
    assert got == list(range(2000))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunksize", [1, 3])
def test_a_failed_item_raises_task_failed_where_iteration_reaches_it(
    backend, chunksize, redis_url
):
    it = pcq.map(fails_on_seven, range(20), workers=2, ordered=True, retries=1,
                 chunksize=chunksize, **options(backend, redis_url))
    got = []
    with pytest.raises(pcq.TaskFailed) as failed:
        for value in it:
            got.append(value)
    assert got == list(range(7))
    assert failed.value.index == 7
    assert "ValueError: seven is right out" in str(failed.value)
    # Iteration may go on past the failed item, as with Pool.imap
    assert list(it) == list(range(8, 20))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_breaking_out_early_stops_every_process(backend, redis_url):
    # Given a map over an endless input, kept in a name
    before = live_children()
    results = pcq.map(abs, iter(int, 1), workers=3, **options(backend, redis_url))
    for seen, _ in enumerate(results):
        if seen == 500:
            assert live_children() - before, "the map's processes should run in the loop"
            break
    # When the loop is left (the iterator still named: nothing collects it)
    # Then no process it started is left
    wait_for(lambda: live_children() <= before, timeout=30, message="map processes to exit")
    assert list(results) == []  # a map that was left yields nothing more
    del results


@pytest.mark.timeout(120)
def test_next_keeps_a_map_running_until_it_is_closed():
    # Given a map read with next(), no loop
    before = live_children()
    results = pcq.map(abs, iter(int, 1), workers=2)
    assert [next(results) for _ in range(100)] == [0] * 100
    # Then it runs until closed
    assert live_children() - before
    results.close()
    assert live_children() <= before


@pytest.mark.timeout(60)
def test_next_and_a_for_loop_may_share_a_map_and_see_each_result_once():
    # Given an ordered map of small chunks, read by a for loop that also calls
    # next() every fifth item (so next() crosses chunks under the loop)
    got = []
    with pcq.map(abs, range(600), workers=2, chunksize=7, ordered=True) as results:
        for k, value in enumerate(results):
            got.append(value)
            if k % 5 == 0:
                got.append(next(results, None))
    # Then every result comes once, in order
    assert [v for v in got if v is not None] == list(range(600))


SCRIPTS = {
    # an item fails and nothing catches TaskFailed: the traceback, then exit 1
    "uncaught-task-failed": (
        "for r in pcq.map(fails_on_seven, range(20), workers=2, **OPTIONS):\n"
        "    pass\n", 1),
    # a map still running when the program ends
    "left-running-at-exit": (
        "results = pcq.map(abs, iter(int, 1), workers=2, **OPTIONS)\n"
        "assert next(results) == 0\n", 0),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_ends_and_leaves_nothing_behind(script, backend, redis_url, tmp_path):
    # Given a script that leaves a map without closing it
    body, code = SCRIPTS[script]
    path = tmp_path / "script.py"
    path.write_text(
        "import pcq\n"
        f"OPTIONS = {options(backend, redis_url)!r}\n"
        "def fails_on_seven(x):\n"
        "    if x == 7:\n"
        "        raise ValueError('seven is right out')\n"
        "    return x\n" + body)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    # When it runs
    proc = subprocess.Popen([sys.executable, str(path)], env=env, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        left = session_pids(proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    # Then it exits by itself, with no process and no broker directory left
    assert proc.returncode == code, err
    assert not left
    assert not list(scratch.glob("pcq-local-*"))
    if code:
        assert "TaskFailed" in err and "seven is right out" in err


@pytest.mark.timeout(120)
def test_map_as_a_context_manager_and_empty_input(redis_url):
    assert list(pcq.map(abs, [])) == []
    with pcq.map(abs, [-1, -2, -3], ordered=True, url=redis_url) as results:
        assert list(results) == [1, 2, 3]


@pytest.mark.timeout(120)
def test_a_map_leaves_no_keys_on_the_server(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    before = set(client.keys("pcq:{pcq-map-*"))
    assert sorted(pcq.map(abs, range(-50, 0), url=redis_url)) == list(range(1, 51))
    assert set(client.keys("pcq:{pcq-map-*")) == before
    client.close()
