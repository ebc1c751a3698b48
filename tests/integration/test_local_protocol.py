"""Issue #15 on the local backend, through `pcq run`: a consumer that dies at
``--concurrency 4`` dead-letters only its culprit, and a pipeline's later stage
spreads its tasks over its workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from apps.jobs import handled
from helpers_cli import ROOT, start_pcq

APP = "tests/apps/jobs.py"


def pcq_run(tmp_path: Path, args: list[str], code: int, **settings: str) -> dict[str, Any]:
    env = dict(os.environ, JOBS_OUT=str(tmp_path), PYTHONPATH=str(ROOT), **settings)
    env.pop("PCQ_URL", None)
    proc = start_pcq(["run", *args, "--json"], env)
    out, err = proc.communicate(timeout=100)
    assert proc.returncode == code, err[-3000:]
    summary: dict[str, Any] = json.loads(out)
    return summary


@pytest.mark.timeout(120)
def test_at_concurrency_4_only_the_tasks_that_kill_their_consumer_are_dead_lettered(
    tmp_path: Path,
) -> None:
    # Given 40 tasks, 2 of which SIGKILL the consumer process running them, at
    # --concurrency 4 and the default --max-deliveries 3
    summary = pcq_run(tmp_path, [f"{APP}:produce", f"{APP}:handle_kills", "--workers", "2",
                                 "--concurrency", "4"], 1,
                      JOBS_N="40", JOBS_KILL="5,17", JOBS_SLEEP="0.02")
    # Then only those two are dead-lettered, each for its own deaths; every
    # innocent task (some shared a process with a culprit) is handled
    failures = summary["failures"]
    assert sorted(f["item"] for f in failures) == ["17", "5"], failures
    assert all("consumer died 3 times" in f["error"] for f in failures), failures
    assert (summary["done"], summary["failed"]) == (38, 2)
    assert set(handled(tmp_path)) == set(range(40)) - {5, 17}
