"""`pcq run` when things go wrong, with real processes and real signals: a
raising handler, a consumer SIGKILLed mid-task, a task past --timeout, SIGTERM
and SIGINT to the job, a SIGKILLed `pcq run` whose children must not survive."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import local_jobs
import pytest
from helpers import finish, session_members, wait_for
from helpers_cli import start_pcq

JOBS = "tests/integration/local_jobs.py"
GRACE = 5.0  # pcq.run's grace period for running tasks after SIGINT / SIGTERM


def start(*args: str, out: Path, **settings: str) -> subprocess.Popen[str]:
    """Start ``pcq ARGS`` on the jobs of local_jobs, in a session of its own
    (its pid is the session id)."""
    return start_pcq(list(args), local_jobs.env(out, **settings))


def pcq(*args: str, out: Path, timeout: float = 60, **settings: str) -> Any:
    return finish(start(*args, out=out, **settings), timeout)


def test_a_raising_handler_is_retried_then_counted_failed_with_its_traceback(
    tmp_path: Path,
) -> None:
    result = pcq("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle_failing", "--retries", "2",
                 "--workers", "3", "--json", "--log-level", "debug", out=tmp_path, timeout=60)

    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("produced", "done", "failed", "retried")} == {
        "produced": 20, "done": 16, "failed": 4, "retried": 8}
    assert sorted(local_jobs.handled(tmp_path)) == [n for n in range(20) if n % 5]
    # each final failure is logged as one error line, its traceback at debug level
    assert len(re.findall(r"ERROR task \d+ failed .* attempt 3/3: ", result.stderr)) == 4
    assert result.stderr.count("Traceback (most recent call last)") == 4
    for n in (0, 5, 10, 15):
        assert f"ValueError: unlucky {n}" in result.stderr


def test_a_consumer_killed_mid_task_is_replaced_and_its_task_done(tmp_path: Path) -> None:
    # Given a job whose task 0 hangs in the consumer that takes it first
    job = start("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle_stuck_once", "--workers",
                "3", "--json", out=tmp_path, LJ_N="30")

    # When that consumer is SIGKILLed mid-task
    victim = wait_for(lambda: local_jobs.victim(tmp_path), message="task 0 started")
    os.kill(victim, signal.SIGKILL)

    # Then its task is handled by another consumer, a replacement started, all done
    result = finish(job)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["restarts"] >= 1
    assert (summary["produced"], summary["done"], summary["failed"]) == (30, 30, 0)
    assert sorted(local_jobs.handled(tmp_path)) == list(range(30))
    assert victim not in local_jobs.handled_by(tmp_path)
    assert f"pid {victim}" in result.stderr  # the supervisor says which consumer died


def test_a_killed_producer_does_not_keep_the_job_open(tmp_path: Path) -> None:
    # Two producers each put five tasks and are SIGKILLed: they never detach
    result = pcq("run", f"{JOBS}:produce_then_die", f"{JOBS}:handle", "--producers", "2",
                 "--workers", "2", "--json", out=tmp_path, timeout=60)

    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert (summary["produced"], summary["done"], summary["producer_errors"]) == (10, 10, 2)
    assert sorted(local_jobs.handled(tmp_path)) == sorted([*range(5), *range(5)])


def test_a_task_past_the_timeout_is_stopped_and_counted_a_failed_attempt(tmp_path: Path) -> None:
    # Task 0 takes 30 s every time, task 1 the first time only
    started = time.monotonic()
    result = pcq("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle_slow_tasks", "--timeout",
                 "0.5", "--retries", "1", "--workers", "2", "--json", out=tmp_path,
                 LJ_N="6", timeout=60)

    assert time.monotonic() - started < 20  # nobody waited for a 30 s task
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("done", "failed", "retried")} == {
        "done": 5, "failed": 1, "retried": 2}
    assert sorted(local_jobs.handled(tmp_path)) == [1, 2, 3, 4, 5]
    assert "TaskTimeout: task ran past its timeout of 0.5 s" in result.stderr


@pytest.mark.parametrize(
    ("signum", "code", "whole_group", "maxsize"),
    [
        (signal.SIGTERM, 143, False, "1000"),
        (signal.SIGINT, 130, False, "1000"),
        (signal.SIGINT, 130, True, "1000"),  # Ctrl-C on a terminal: the whole process group
        (signal.SIGTERM, 143, False, "0"),  # the producer has filled the pipe
    ],
    ids=["SIGTERM", "SIGINT", "ctrl-c-to-the-group", "SIGTERM-unbounded-queue"],
)
def test_a_signal_stops_the_job_gracefully(
    tmp_path: Path, signum: int, code: int, whole_group: bool, maxsize: str
) -> None:
    # Given a long job with tasks running
    job = start("run", f"{JOBS}:produce_forever", f"{JOBS}:handle_logged", "--workers", "3",
                "--maxsize", maxsize, "--json", out=tmp_path, LJ_SLEEP="0.3")
    wait_for(lambda: len(local_jobs.started(tmp_path)) >= 3, message="tasks running")

    # When it is signalled
    sent = time.monotonic()
    if whole_group:
        os.killpg(job.pid, signum)
    else:
        os.kill(job.pid, signum)

    # Then it exits with 128 + signal within the grace period ...
    result = finish(job, timeout=GRACE + 15)  # and leaves no process behind
    assert result.returncode == code, result.stderr
    assert time.monotonic() - sent < GRACE + 3
    # ... having let the running tasks finish
    assert sorted(local_jobs.started(tmp_path)) == sorted(local_jobs.handled(tmp_path))
    summary = json.loads(result.stdout)
    assert (summary["interrupted"], summary["exit_code"]) == (signum, code)
    assert summary["done"] == len(local_jobs.handled(tmp_path))
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("maxsize", ["1000", "0"], ids=["bounded", "unbounded-queue"])
def test_a_task_longer_than_the_grace_period_is_cut_short(tmp_path: Path, maxsize: str) -> None:
    job = start("run", f"{JOBS}:produce_forever", f"{JOBS}:handle_logged", "--workers", "2",
                "--maxsize", maxsize, out=tmp_path, LJ_SLEEP="60")
    wait_for(lambda: len(local_jobs.started(tmp_path)) >= 2, message="tasks running")

    sent = time.monotonic()
    job.terminate()

    assert finish(job, timeout=GRACE + 15).returncode == 143
    assert GRACE - 0.5 < time.monotonic() - sent < GRACE + 3


@pytest.mark.parametrize(
    ("maxsize", "sleep"),
    [("16", "0.05"), ("2", "0.05"), ("0", "0.05"), ("16", "60")],
    ids=["bounded", "producer-blocked-on-full-queue", "unbounded-queue", "long-tasks"],
)
def test_children_do_not_outlive_a_killed_pcq_run(
    tmp_path: Path, maxsize: str, sleep: str
) -> None:
    # Given a running job
    job = start("run", f"{JOBS}:produce_forever", f"{JOBS}:handle_logged", "--workers", "3",
                "--maxsize", maxsize, out=tmp_path, LJ_SLEEP=sleep)
    wait_for(lambda: len(local_jobs.started(tmp_path)) >= 3, message="tasks running")
    children = session_members(job.pid, zombies=False)
    assert len(children) >= 5  # pcq run, 3 consumers, 1 producer

    # When `pcq run` itself is SIGKILLed
    job.kill()
    job.wait(10)

    # Then every child exits by itself within a few seconds (a running task
    # may go on for the grace period)
    try:
        wait_for(lambda: not session_members(job.pid, zombies=False), timeout=GRACE + 5,
                 message="the children of the killed `pcq run` to exit")
    finally:
        for pid in session_members(job.pid, zombies=False):  # do not leak them into others
            os.kill(pid, signal.SIGKILL)
        job.communicate()
