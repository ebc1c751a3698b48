"""The job engine's decisions, through ``pcq run`` as a real process, on the
local backend and on a real redis-server: a producer SIGKILLed mid-stream is
detached by its own id at once, the close follows, and the job ends by itself
counting it as a producer error — with one stage or several."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import finish
from helpers_cli import PCQ, pcq_env, start_pcq

APP = "tests/apps/engine_jobs.py"
#: On Redis the jobs run with this heartbeat TTL: a job that waited for a dead
#: producer's registration to expire would take longer than ENDS_WITHIN, which
#: is far more than a loaded machine needs for the job itself.
HEARTBEAT_TTL = 30
ENDS_WITHIN = 20.0


def backend_args(backend: str, redis_url: str) -> list[str]:
    if backend == "local":
        return []
    return ["--backend", "redis", "--url", redis_url, "--heartbeat-ttl", str(HEARTBEAT_TTL)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "redis"])
@pytest.mark.parametrize("stages", [1, 2], ids=["one-stage", "two-stages"])
def test_a_killed_producer_is_a_producer_error_and_the_job_ends(
    backend: str, stages: int, redis_url: str, tmp_path: Path
) -> None:
    # Given two producers of 20 tasks each, one of which SIGKILLs itself after five
    env = pcq_env(redis_url, tmp_path, EJ_OUT=str(tmp_path), EJ_N="20")
    if backend == "local":
        del env["PCQ_URL"]
    handlers = [f"{APP}:forward"] * (stages - 1) + [f"{APP}:handle"]
    # When the job runs
    proc = start_pcq(["run", f"{APP}:produce_one_dies", *handlers, "--producers", "2",
                      "--json", "--no-progress", *backend_args(backend, redis_url)], env)
    done = finish(proc, timeout=90)
    # Then it ends by itself, exit 1, the dead producer counted, every task put done
    summary = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert summary["producer_errors"] == 1
    # (what the dead one yielded last may have died with it, unsent)
    assert 20 <= summary["produced"] == summary["done"] <= 25
    assert summary["elapsed_s"] < ENDS_WITHIN, summary
    # And its queues are closed, not left open for a next producer
    if backend == "redis":
        status = subprocess.run([*PCQ, "status", "--json"], env=env, capture_output=True,
                                text=True, timeout=60, check=True)
        queues = json.loads(status.stdout).get("stages") or [json.loads(status.stdout)]
        assert [q["state"] for q in queues] == ["idle"] * stages
