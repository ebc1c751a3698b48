"""Issue #15 on the local backend, through `pcq run`: a consumer that dies at
``--concurrency 4`` dead-letters only its culprit, and a pipeline's later stage
spreads its tasks over its workers."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from apps.jobs import handled, timed
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


def _spread(rows: list[list[Any]]) -> tuple[list[int], float]:
    """Tasks per worker pid (most first) and the stage's time, first start to last end."""
    per_pid = sorted(Counter(row[1] for row in rows).values(), reverse=True)
    return per_pid, max(row[3] for row in rows) - min(row[2] for row in rows)


@pytest.mark.timeout(120)
def test_a_later_stage_spreads_its_tasks_over_its_workers(tmp_path: Path) -> None:
    # Given the same 0.05 s handler, alone and behind a cheap first stage whose
    # outputs travel as a few large batches
    alone, piped = tmp_path / "alone", tmp_path / "piped"
    alone.mkdir()
    piped.mkdir()
    settings = {"JOBS_N": "60", "JOBS_SLEEP": "0.05"}
    pcq_run(alone, [f"{APP}:produce", f"{APP}:handle_timed", "--workers", "2"], 0, **settings)
    pcq_run(piped, [f"{APP}:produce", f"{APP}:passthrough", f"{APP}:handle_timed",
                    "--workers", "2,2"], 0, **settings)
    # Then each worker of the later stage runs at least 30 % of its tasks, and
    # the stage takes about as long as the handler alone
    single, single_time = _spread(timed(alone))
    later, later_time = _spread(timed(piped))
    assert sum(later) == sum(single) == 60
    assert len(later) == 2 and later[1] >= 0.3 * 60, later
    assert later_time <= 1.4 * single_time, (later_time, single_time)
