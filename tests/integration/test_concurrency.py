"""``--concurrency``: many tasks at once in each consumer process, on both
backends, as a user runs it (``pcq run`` / ``pcq produce`` + ``pcq consume``).

Handlers (tests/apps/slots_jobs.py) record when each task started and ended;
the tests look at those records, never at the wall clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from apps.slots_jobs import most_at_once, records
from helpers import wait_for
from helpers_cli import pcq_env, start_pcq

APP = "tests/apps/slots_jobs.py"


@pytest.fixture(params=["local", "redis"])
def env_for(request: pytest.FixtureRequest, tmp_path: Path):
    """A function making the environment of a `pcq` child on this test's backend."""

    def make(**extra: str) -> dict[str, str]:
        url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
        env = pcq_env(url, tmp_path, **extra)
        if not url:
            del env["PCQ_URL"]
        return env

    make.backend = request.param  # type: ignore[attr-defined]
    return make


def run(env: dict[str, str], handler: str, *args: str) -> subprocess.Popen[str]:
    return start_pcq(["run", f"{APP}:produce", f"{APP}:{handler}", "--no-progress", "--json",
                      *args], env)


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=timeout)
    summary = json.loads(out) if out.strip() else {}
    return proc.returncode, summary, err


def handled(out: Path) -> Counter[int]:
    return Counter(record[0] for _, record in records(out))


def started(out: Path) -> list[tuple[int, int]]:
    """(pid, item) of every task start."""
    return [(pid, record[0]) for pid, record in records(out, "started")]


def in_flight(out: Path) -> dict[int, set[int]]:
    """pid -> the items it started and has not finished."""
    finished = {(pid, record[0]) for pid, record in records(out)}
    running: dict[int, set[int]] = {}
    for pid, item in started(out):
        if (pid, item) not in finished:
            running.setdefault(pid, set()).add(item)
    return running


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler", ["sleepy", "asleepy"])
def test_tasks_overlap_in_one_consumer_process(env_for, tmp_path: Path, handler: str) -> None:
    # Given one consumer process with 8 slots and tasks that each take a while
    env = env_for(JOBS_N="40", SLOTS_HOLD="0.4")
    # When the job runs
    code, summary, err = finish(run(env, handler, "--workers", "1", "--concurrency", "8"))
    # Then every task is done once ...
    assert code == 0, err
    assert summary["done"] == 40 and summary["failed"] == 0
    assert handled(tmp_path) == Counter(range(40))
    # ... in one process, with several tasks running at the same moment
    assert len({pid for pid, _ in records(tmp_path)}) == 1
    assert most_at_once(tmp_path) >= 4
    threads = {record[3] for _, record in records(tmp_path)}
    if handler == "sleepy":  # threads for a plain function, one event loop for async def
        assert len(threads) >= 4
    else:
        assert len(threads) == 1


@pytest.mark.timeout(120)
def test_a_consumer_killed_with_many_tasks_in_flight_loses_none(env_for, tmp_path: Path) -> None:
    # Given a consumer process holding many tasks at once (each held until released)
    env = env_for(JOBS_N="60", SLOTS_HOLD="1.0")
    proc = run(env, "sleepy", "--workers", "1", "--concurrency", "10")
    busy = wait_for(lambda: {p: s for p, s in in_flight(tmp_path).items() if len(s) >= 5},
                    timeout=60, message="a consumer with 5 tasks in flight")
    victim, held = next(iter(busy.items()))
    # When it is SIGKILLed mid-tasks, then the tasks are released
    os.kill(victim, signal.SIGKILL)
    (tmp_path / "go").touch()
    code, summary, err = finish(proc)
    # Then the job still ends with every task done, the killed ones by another process
    assert code == 0, err
    assert summary["done"] == 60 and summary["restarts"] == 1
    assert set(handled(tmp_path)) == set(range(60))
    redone = {item for pid, (item, *_) in records(tmp_path) if pid != victim}
    assert held <= redone


@pytest.mark.timeout(120)
def test_a_raising_task_among_many_is_retried_alone(env_for, tmp_path: Path) -> None:
    # Given 30 tasks run 10 at a time, where task 7 fails on its first attempt
    env = env_for(JOBS_N="30")
    code, summary, err = finish(run(env, "flaky_once", "--workers", "1", "--concurrency", "10",
                                    "--retries", "2"))
    # Then only task 7 ran twice, and every task is done once
    assert code == 0, err
    assert summary["done"] == 30 and summary["retried"] == 1 and summary["failed"] == 0
    assert handled(tmp_path) == Counter(range(30))
    starts = Counter(item for _, item in started(tmp_path))
    assert starts == Counter({**dict.fromkeys(range(30), 1), 7: 2})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("concurrency", ["1", "5"])
def test_timeout_cancels_an_async_task(env_for, tmp_path: Path, concurrency: str) -> None:
    # Given async tasks of which every fifth never ends by itself
    env = env_for(JOBS_N="10")
    code, summary, err = finish(run(env, "async_stuck", "--workers", "1", "--concurrency",
                                    concurrency, "--timeout", "0.5"))
    # Then those two count failed (they were cancelled), the rest are done
    assert code == 1
    assert summary["done"] == 8 and summary["failed"] == 2, err
    assert sorted(record for _, record in records(tmp_path, "cancelled")) == [0, 5]
    assert set(handled(tmp_path)) == set(range(10)) - {0, 5}
    assert "TaskTimeout" in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler", ["thread_stuck", "async_blocking"])
def test_timeout_of_a_task_that_cannot_be_interrupted(env_for, tmp_path: Path,
                                                      handler: str) -> None:
    # Given tasks that cannot be interrupted: a thread, or a loop blocked by time.sleep
    env = env_for(JOBS_N="10")
    code, summary, err = finish(run(env, handler, "--workers", "1", "--concurrency", "5",
                                    "--timeout", "0.5"))
    # Then the attempt counts failed once its time is up, and the job ends
    assert code == 1
    assert summary["done"] == 8 and summary["failed"] == 2, err
    assert "TaskTimeout" in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler", ["sleepy", "asleepy"])
def test_sigterm_lets_running_tasks_finish_and_hands_back_the_rest(
    env_for, tmp_path: Path, handler: str
) -> None:
    # Given a consumer with 5 slots, busy with tasks held until released
    env = env_for(JOBS_N="100", SLOTS_HOLD="2")
    if env_for.backend == "redis":
        assert finish(start_pcq(["produce", f"{APP}:produce", "--no-wait", "--json"], env))[0] == 0
        proc = start_pcq(["consume", f"{APP}:{handler}", "--workers", "1", "--concurrency", "5",
                          "--json"], env)
    else:
        proc = run(env, handler, "--workers", "1", "--concurrency", "5")
    wait_for(lambda: sum(map(len, in_flight(tmp_path).values())) >= 5, timeout=60,
             message="5 tasks in flight")
    # When it gets SIGTERM (its running tasks end within the 5 s grace)
    proc.send_signal(signal.SIGTERM)
    code, summary, err = finish(proc)
    # Then it exits as interrupted, every task it started finished, none ran twice
    assert code == 143, err
    assert handled(tmp_path) == Counter(item for _, item in started(tmp_path))
    assert summary["done"] == len(handled(tmp_path)) < 100
    if env_for.backend == "redis":  # ... and the rest is back in the queue, unstarted
        status = subprocess.run(
            [sys.executable, "-m", "pcq.cli", "status", "--json"], env=env, capture_output=True,
            text=True, timeout=60, check=True)
        counters = json.loads(status.stdout)
        assert counters["ready"] == 100 - summary["done"]
        assert counters["in_flight"] == 0 and counters["pending"] == counters["ready"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("concurrency", ["1", "4"])
def test_an_async_handler_is_awaited(env_for, tmp_path: Path, concurrency: str) -> None:
    # Given an async def handler (it used to be counted done without running)
    env = env_for(JOBS_N="10")
    code, summary, err = finish(run(env, "plain_async", "--workers", "2", "--concurrency",
                                    concurrency))
    # Then every task really ran, once
    assert code == 0, err
    assert summary["done"] == 10
    assert handled(tmp_path) == Counter(range(10))
    assert "never awaited" not in err


@pytest.mark.timeout(120)
def test_heartbeat_goes_on_while_a_handler_blocks_its_event_loop(redis_url: str,
                                                                 tmp_path: Path) -> None:
    # Given a 1 s heartbeat ttl and async handlers that block the loop for 1.6 s,
    # two at a time in each consumer, with a second consumer process that would
    # reap a consumer it thinks dead
    env = pcq_env(redis_url, tmp_path, JOBS_N="4", PCQ_HEARTBEAT_TTL="1", SLOTS_BLOCK="1.6")
    code, summary, err = finish(run(env, "async_blocks_loop", "--workers", "2",
                                    "--concurrency", "4"))
    # Then no task was taken from its (alive) consumer and run again
    assert code == 0, err
    assert summary["done"] == 4
    assert handled(tmp_path) == Counter(range(4))
    assert Counter(item for _, item in started(tmp_path)) == Counter(range(4))
