"""Pipelines with real processes: `pcq run` with several handlers (local and
Redis) and `pcq consume --to` hosts on a real redis-server, with stage workers
SIGKILLed at random.  Stages: ``double`` (one output a task), ``spread`` (a
generator that filters and fans out), ``record`` (the sink, never killed here,
so what it records is exactly what reached its queue)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from apps.pipes import expected, recorded, stage_pids
from helpers import finish, processes
from helpers_cli import PCQ, pcq_env, start_pcq

APP = "tests/apps/pipes.py"
STAGES = [f"{APP}:double", f"{APP}:spread", f"{APP}:record"]


class Killer(threading.Thread):
    """SIGKILLs a random live worker of ``stages`` every 150-400 ms, if its parent
    is one of ``parents()`` (a supervisor), until stopped."""

    def __init__(self, out: Path, stages: list[str], parents: Callable[[], set[int]]) -> None:
        super().__init__(daemon=True)
        self.out, self.stages, self.parents = out, stages, parents
        self.kills = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        rng = random.Random()
        while not self._stop_event.wait(rng.uniform(0.15, 0.4)):
            table, parents = processes(), self.parents()
            victims = [pid for stage in self.stages for pid in stage_pids(self.out, stage)
                       if pid in table and table[pid][0] != "Z" and table[pid][1] in parents]
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.kills


def run_pipeline(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return start_pcq(["run", f"{APP}:produce", *STAGES, "--json", "--no-progress", *args], env)


def backend_args(backend: str, redis_url: str) -> list[str]:
    return [] if backend == "local" else ["--backend", "redis", "--url", redis_url]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_three_stages_every_output_exactly_once(backend, redis_url, tmp_path):
    # Given a map, a generator that filters and fans out, and a sink
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N="3000")
    # When the pipeline runs with its own worker count per stage
    done = finish(run_pipeline(env, "--workers", "3,2,1", *backend_args(backend, redis_url)))
    # Then it exits 0, every output arrived once, and --json reports every stage
    assert done.returncode == 0, done.stderr
    assert recorded(tmp_path) == expected(3000)
    if backend == "redis":  # a second run on the same queues starts afresh
        os.remove(next(tmp_path.glob("sink-*")))
        for extra in tmp_path.glob("sink-*"):
            os.remove(extra)
        again = finish(run_pipeline(env, "--workers", "3,2,1", *backend_args(backend, redis_url)))
        assert again.returncode == 0, again.stderr
        assert recorded(tmp_path) == expected(3000)
    summary = json.loads(done.stdout)
    sink = sum(expected(3000).values())
    assert (summary["produced"], summary["done"], summary["failed"]) == (3000, sink, 0)
    assert [s["name"] for s in summary["stages"]] == ["double", "spread", "record"]
    assert [s["workers"] for s in summary["stages"]] == [3, 2, 1]
    assert [(s["produced"], s["done"]) for s in summary["stages"]] == [
        (3000, 3000), (3000, 3000), (sink, sink)]
    assert all(s["failed"] == s["retried"] == s["dead"] == 0 for s in summary["stages"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_stage_workers_killed_at_random_every_run_finishes_exactly_once(
    backend, redis_url, tmp_path
):
    n = 4000
    for attempt in range(2):
        # Given a pipeline of thousands of items whose first two stages' workers
        # are SIGKILLed every few hundred ms
        out = tmp_path / f"run-{attempt}"
        out.mkdir()
        env = pcq_env(redis_url, out, PIPES_OUT=str(out), PIPES_N=str(n), PIPES_SLEEP="0.0005")
        # Random kills of innocent workers are no poison: no delivery limit
        proc = run_pipeline(env, "--workers", "2,2,1", "--max-deliveries", "0",
                            *backend_args(backend, redis_url))
        killer = Killer(out, ["double", "spread"], lambda proc=proc: {proc.pid})
        killer.start()
        try:
            done = finish(proc, timeout=240)
        finally:
            kills = killer.stop()
        # Then the run finishes by itself, exits 0, each output exactly once
        assert done.returncode == 0, done.stderr
        assert kills > 0, "the run ended before any worker was killed"
        assert recorded(out) == expected(n)
        summary = json.loads(done.stdout)
        assert summary["stages"][2]["produced"] == sum(expected(n).values())
        assert summary["restarts"] >= 1


@pytest.mark.timeout(300)
def test_redis_pipeline_over_consume_to_hosts_with_workers_killed(redis_url, tmp_path):
    # Given, per stage, separate `pcq consume --to` hosts on one server
    n = 3000
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N=str(n),
                  PIPES_SLEEP="0.0005")
    first = env["PCQ_QUEUE"]
    second, third = f"{{{first}}}.parse", f"{{{first}}}.save"
    no_limit = ["--max-deliveries", "0"]  # random kills of innocent workers are no poison
    hosts = [
        start_pcq(["consume", STAGES[0], "--workers", "2", *no_limit, "--queue", first,
                   "--to", second], env),
        start_pcq(["consume", STAGES[0], "--workers", "1", *no_limit, "--queue", first,
                   "--to", second], env),
        start_pcq(["consume", STAGES[1], "--workers", "2", *no_limit, "--queue", second,
                   "--to", third], env),
        start_pcq(["consume", STAGES[2], "--workers", "1", *no_limit, "--queue", third], env),
    ]
    killer = Killer(tmp_path, ["double", "spread"], lambda: {h.pid for h in hosts[:3]})
    killer.start()
    try:
        # When one producer puts the items and waits for the first stage
        produced = finish(start_pcq(["produce", f"{APP}:produce", "--json"], env), 240)
        # Then every host exits 0 on its own, stage after stage
        results = [finish(host, timeout=240) for host in hosts]
    finally:
        kills = killer.stop()
    assert produced.returncode == 0, produced.stderr
    for result in results:
        assert result.returncode == 0, result.stderr
    assert kills > 0
    # ... and every output reached the sink exactly once
    assert recorded(tmp_path) == expected(n)
    # ... and `pcq status` shows where each queue feeds
    status = subprocess.run([*PCQ, "status", "--queue", first, "--json"], env=env,
                            capture_output=True, text=True, check=True)
    info = json.loads(status.stdout)
    assert [s["queue"] for s in info["stages"]] == [first, second, third]
    assert [s["feeds"] for s in info["stages"]] == [second, third, None]
    assert info["stages"][2]["done"] == sum(expected(n).values())


@pytest.mark.timeout(120)
def test_a_failing_stage_counts_in_its_row_and_its_dead_letters_are_listed(redis_url, tmp_path):
    # Given a pipeline whose second stage fails one task for good
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N="20")
    done = finish(start_pcq(["run", f"{APP}:produce", STAGES[0], f"{APP}:picky", STAGES[2],
                             "--json", "--no-progress", "--retries", "0,1,0",
                             *backend_args("redis", redis_url)], env))
    # Then the job exits 1, the failure is counted where it happened ...
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert [s["failed"] for s in summary["stages"]] == [0, 1, 0]
    assert [s["retried"] for s in summary["stages"]] == [0, 1, 0]
    assert (summary["failed"], summary["dead"]) == (1, 1)
    # ... and `pcq dead list` shows it on that stage's queue
    second = "{" + env["PCQ_QUEUE"] + "}.2"
    letters = subprocess.run([*PCQ, "dead", "list", "--queue", second, "--json"], env=env,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(letters) == 1 and "sixteen is unlucky" in json.loads(letters[0])["error"]
