"""Pipeline stages with --concurrency, real processes on both backends: a
sleeping middle stage runs many tasks at once in one process (threads for a
generator, asyncio for async def), every output still reaches the sink exactly
once, also when a concurrent stage worker is SIGKILLed with tasks in flight.
Handlers record when each task ran (tests/apps/pipes.py); the tests look at
those records, never at the wall clock."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from apps.pipes import expected, most_at_once, recorded, stage_pids
from helpers import finish, processes, wait_for
from helpers_cli import pcq_env, start_pcq

APP = "tests/apps/pipes.py"


def backend_args(backend: str, redis_url: str) -> list[str]:
    return [] if backend == "local" else ["--backend", "redis", "--url", redis_url]


def spans(out: Path, stage: str) -> int:
    return sum(len(p.read_text().splitlines()) for p in out.glob(f"spans-{stage}-*"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "redis"])
@pytest.mark.parametrize(("stages", "slow", "concurrency"), [
    (["double", "slow_spread", "record"], "slow_spread", "1,20,1"),  # threads, a generator
    (["double", "apass", "spread", "record"], "apass", "1,20,1,1"),  # asyncio
])
def test_a_concurrent_middle_stage_overlaps_and_hands_off_exactly_once(
    backend, redis_url, tmp_path, stages, slow, concurrency
):
    # Given a pipeline whose middle stage waits on each task, one worker with 20 slots
    n = 300
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N=str(n),
                  PIPES_HOLD="0.05")
    workers = ",".join("1" for _ in stages)
    # When it runs with one --concurrency value per stage
    done = finish(start_pcq(["run", f"{APP}:produce", *(f"{APP}:{s}" for s in stages),
                             "--workers", workers, "--concurrency", concurrency, "--json",
                             "--no-progress", *backend_args(backend, redis_url)], env))
    # Then it exits 0, every output reached the sink exactly once ...
    assert done.returncode == 0, done.stderr
    assert recorded(tmp_path) == expected(n)
    summary = json.loads(done.stdout)
    assert all(s["failed"] == s["dead"] == 0 for s in summary["stages"])
    assert summary["stages"][-1]["done"] == sum(expected(n).values())
    # ... and the slow stage's tasks overlapped in its one process
    assert len(stage_pids(tmp_path, slow)) == 1
    assert most_at_once(tmp_path, slow) >= 4


def kill_a_busy_worker(out: Path, stage: str, parents: set[int]) -> int:
    """SIGKILL a worker of ``stage`` (a child of one of ``parents``) once it has
    finished some tasks, so it holds others in flight; its pid."""
    wait_for(lambda: spans(out, stage) >= 20, timeout=60, message=f"{stage} under way")
    table = processes()
    victim = next(pid for pid in stage_pids(out, stage)
                  if pid in table and table[pid][0] != "Z" and table[pid][1] in parents)
    os.kill(victim, signal.SIGKILL)
    return victim


@pytest.mark.timeout(180)
def test_local_concurrent_stage_worker_killed_mid_run_each_output_once(redis_url, tmp_path):
    # Given a local pipeline whose middle stage runs 10 tasks at once in each of 2 workers
    n = 400
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N=str(n),
                  PIPES_HOLD="0.1")
    proc = start_pcq(["run", f"{APP}:produce", f"{APP}:double", f"{APP}:slow_spread",
                      f"{APP}:record", "--workers", "1,2,1", "--concurrency", "1,10,1",
                      "--json", "--no-progress"], env)
    # When one of those workers is SIGKILLed with tasks in flight
    kill_a_busy_worker(tmp_path, "slow_spread", {proc.pid})
    done = finish(proc, timeout=150)
    # Then the run still ends by itself with each output exactly once
    assert done.returncode == 0, done.stderr
    assert recorded(tmp_path) == expected(n)
    assert json.loads(done.stdout)["stages"][1]["restarts"] == 1


@pytest.mark.timeout(180)
def test_redis_consume_to_with_concurrency_worker_killed_each_output_once(redis_url, tmp_path):
    # Given `pcq consume --to` hosts, the middle one with --concurrency 10
    n = 400
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N=str(n),
                  PIPES_HOLD="0.1")
    first = env["PCQ_QUEUE"]
    second, third = f"{{{first}}}.parse", f"{{{first}}}.save"
    hosts = [
        start_pcq(["consume", f"{APP}:double", "--workers", "1", "--queue", first,
                   "--to", second], env),
        start_pcq(["consume", f"{APP}:slow_spread", "--workers", "2", "--concurrency", "10",
                   "--queue", second, "--to", third], env),
        start_pcq(["consume", f"{APP}:record", "--workers", "1", "--queue", third], env),
    ]
    producer = start_pcq(["produce", f"{APP}:produce", "--json"], env)
    # When one of its workers is SIGKILLed with tasks in flight
    kill_a_busy_worker(tmp_path, "slow_spread", {hosts[1].pid})
    produced = finish(producer, timeout=150)
    results = [finish(host, timeout=150) for host in hosts]
    # Then every host exits 0 on its own and each output reached the sink once
    assert produced.returncode == 0, produced.stderr
    for result in results:
        assert result.returncode == 0, result.stderr
    assert recorded(tmp_path) == expected(n)
    assert most_at_once(tmp_path, "slow_spread") >= 4
