"""Issue #8 on the local backend, through `pcq run`: a handler that swallows its
timeout (and returns, or hangs) and a crash loop.  Poison tasks and idle-is-new
on local are in test_local_chaos.py and the conformance suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from apps.jobs import handled
from helpers_cli import ROOT, start_pcq

APP = "tests/apps/jobs.py"


def run_local(tmp_path, handler: str, *args: str, **settings: str) -> dict[str, object]:
    env = dict(os.environ, JOBS_OUT=str(tmp_path), PYTHONPATH=str(ROOT), **settings)
    env.pop("PCQ_URL", None)
    proc = start_pcq(["run", f"{APP}:produce", f"{APP}:{handler}", "--workers", "2",
                      "--json", *args], env)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 1, err[-3000:]
    summary: dict[str, object] = json.loads(out)
    return summary


@pytest.mark.timeout(240)
def test_a_handler_that_swallows_its_timeout_and_returns_still_fails(tmp_path):
    summary = run_local(tmp_path, "handle_swallow", "--timeout", "0.3",
                        JOBS_N="10", JOBS_POISON="3", JOBS_AFTER="0.2")
    assert (summary["done"], summary["failed"], summary["restarts"]) == (9, 1, 0)
    assert sorted(handled(tmp_path)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]


@pytest.mark.timeout(240)
def test_a_handler_that_swallows_its_timeout_and_hangs_is_killed_and_the_task_fails(tmp_path):
    # Killed past timeout + grace, twice (one retry): each kill is a failed
    # attempt, not a death — at --max-deliveries 1 a death would dead-letter it
    # at the first kill as "consumer died".  The other tasks are all handled.
    summary = run_local(tmp_path, "handle_swallow", "--timeout", "0.5", "--retries", "1",
                        "--max-deliveries", "1", JOBS_N="20", JOBS_POISON="5", JOBS_AFTER="600")
    assert (summary["done"], summary["failed"], summary["retried"]) == (19, 1, 1)
    assert summary["restarts"] == 2
    (letter,) = summary["failures"]
    assert letter["item"] == "5" and "TaskTimeout" in letter["error"], letter
    assert set(handled(tmp_path)) == set(range(20)) - {5}


@pytest.mark.timeout(240)
def test_a_handler_stuck_in_c_code_past_its_timeout_is_killed_and_the_task_fails(tmp_path):
    # No TaskTimeout can be raised inside that C call: only the kill ends it.
    summary = run_local(tmp_path, "handle_in_c", "--timeout", "0.5", "--max-deliveries", "1",
                        JOBS_N="10", JOBS_POISON="3")
    assert (summary["done"], summary["failed"], summary["restarts"]) == (9, 1, 1)
    (letter,) = summary["failures"]
    assert letter["item"] == "3" and "TaskTimeout" in letter["error"], letter
    assert set(handled(tmp_path)) == set(range(10)) - {3}


@pytest.mark.timeout(240)
def test_a_crash_loop_restarts_consumers_with_a_backoff_and_ends(tmp_path):
    summary = run_local(tmp_path, "handle_dies", "--max-deliveries", "2", JOBS_N="6")
    assert (summary["done"], summary["failed"]) == (0, 6)
    restarts = summary["restarts"]
    assert isinstance(restarts, int) and 6 <= restarts <= 20
    assert summary["elapsed_s"] > min(5.0, 0.1 * 2 ** (restarts - 2))


def test_python_api_takes_max_deliveries(tmp_path: Path) -> None:
    code = ("import pcq, os, sys\n"
            "def produce(): return range(5)\n"
            "def handle(x):\n"
            "    if x == 2:\n"
            "        open(os.path.join(sys.argv[1], f'died-{os.getpid()}'), 'w').close()\n"
            "        os._exit(1)\n"
            "s = pcq.run(produce, handle, workers=2, max_deliveries=1)\n"
            "print(s.failed, s.done, s.restarts)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    # one death was enough (the default, 3, takes three); at 1 the tasks that
    # shared the poison's lease when it first struck go with it.  The dead
    # consumer is replaced unless the other one finished the run first.
    failed, done, restarts = map(int, proc.stdout.split())
    assert failed + done == 5 and failed >= 1 and restarts <= 1, proc.stderr[-2000:]
    assert len(list(tmp_path.glob("died-*"))) == 1
