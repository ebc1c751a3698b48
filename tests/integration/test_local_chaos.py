"""The local backend under SIGKILL: random kill storms over several runs, a kill
at each named point of the protocol (made deterministic by the test-only fault
hook ``PCQ_TEST_PAUSE_AT``, which stops the process right there), poison tasks,
and how fast a dead consumer's tasks come back."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import local_jobs
import pytest
from helpers import finish, session_members, wait_for
from helpers_cli import start_pcq

from pcq.backends import open_queue
from pcq.backends.base import Queue
from pcq.roles import Consumer, Producer
from pcq.settings import StageSettings
from pcq.supervisor import Supervisor, wait

JOBS = "tests/integration/local_jobs.py"
fork = mp.get_context("fork")
RUNS = 4  # kill-storm runs in one session: ~10-20 s on 2 busy cores


def start(*args: str, out: Path, **settings: str) -> subprocess.Popen[str]:
    return start_pcq(list(args), local_jobs.env(out, **settings))


def _alive(job: subprocess.Popen[str], pids: set[int]) -> list[int]:
    members = session_members(job.pid, zombies=False)
    return sorted(p for p in pids if p in members)


def _kill_storm(job: subprocess.Popen[str], out: Path, rng: random.Random,
                kill_producer: bool) -> int:
    """SIGKILL a random consumer every 0.1-0.5 s until the job ends (and, with
    ``kill_producer``, the producer once); how many processes were killed."""
    kills = 0
    producer_killed = not kill_producer
    while job.poll() is None:
        time.sleep(rng.uniform(0.1, 0.5))
        if not producer_killed and (victims := _alive(job, local_jobs.producers(out))):
            producer_killed = True
            kills += _kill(victims[0])
            continue
        if victims := _alive(job, local_jobs.consumers(out)):
            kills += _kill(rng.choice(victims))
    return kills


def _kill(pid: int) -> int:
    """SIGKILL ``pid``; 0 if it exited (and was reaped) since it was seen alive."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    return 1


@pytest.mark.timeout(120)
def test_kill_storms_never_lose_a_task_nor_hang_the_job(tmp_path: Path) -> None:
    rng = random.Random(7)
    started = time.monotonic()
    for run in range(RUNS):
        out = tmp_path / f"run-{run}"
        out.mkdir()
        n = 6000
        # A storm kills innocent consumers: a task in flight at several of the
        # kills is bad luck, not a poison task, so no delivery limit here.
        job = start("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle", "--workers", "3",
                    "--max-deliveries", "0", "--json", out=out, LJ_N=str(n),
                    LJ_SLEEP="0.0005")
        kills = _kill_storm(job, out, rng, kill_producer=False)
        result = finish(job, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads(result.stdout)
        assert (summary["produced"], summary["done"], summary["failed"]) == (n, n, 0)
        assert set(local_jobs.handled(out)) == set(range(n))
        print(f"run {run}: {kills} consumers killed, {summary['restarts']} restarts, "
              f"{len(local_jobs.handled(out)) - n} tasks handled twice")
    print(f"{RUNS} kill-storm runs in {time.monotonic() - started:.1f} s")


@pytest.mark.timeout(120)
def test_a_killed_producer_loses_nothing_it_put_and_the_job_ends(tmp_path: Path) -> None:
    rng = random.Random(11)
    for run in range(2):
        out = tmp_path / f"run-{run}"
        out.mkdir()
        job = start("run", f"{JOBS}:produce_paced", f"{JOBS}:handle", "--workers", "3",
                    "--max-deliveries", "0", "--json", out=out, LJ_N="20000",
                    LJ_SLEEP="0.0002")
        _kill_storm(job, out, rng, kill_producer=True)
        result = finish(job, timeout=60)
        assert result.returncode == 1, result.stderr[-2000:]  # the producer failed
        summary = json.loads(result.stdout)
        put = summary["produced"]
        assert 0 < put < 20000
        assert (summary["done"], summary["failed"]) == (put, 0)
        # Batches go out in order: what was put is a prefix, every task handled
        assert set(local_jobs.handled(out)) == set(range(put))


# ---------------------------------------------------------------- one kill at each point


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    return data[data.rindex(")") + 2] == "T"


def _kill_when_paused(job: subprocess.Popen[str], out: Path) -> int:
    """The process that paused at the fault point (it wrote its pid): SIGKILL it there."""
    pause_file = out / "paused"
    pid = wait_for(lambda: pause_file.exists() and pause_file.read_text()
                   and int(pause_file.read_text()), timeout=30, message="a fault point reached")
    wait_for(lambda: _stopped(pid), timeout=10, message="the process stopped at the point")
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("point", "handler", "settings"),
    [
        ("take", "handle", {}),
        ("ack", "handle", {}),
        ("give-back", "handle_stop_at", {"LJ_STOP_AT": "700"}),
    ],
)
def test_a_consumer_killed_at_a_protocol_point_loses_nothing(
    tmp_path: Path, point: str, handler: str, settings: dict[str, str]
) -> None:
    n = 3000
    job = start("run", f"{JOBS}:produce_numbers", f"{JOBS}:{handler}", "--workers", "2",
                "--json", out=tmp_path, LJ_N=str(n), PCQ_TEST_PAUSE_AT=point,
                PCQ_TEST_PAUSE_FILE=str(tmp_path / "paused"), **settings)
    victim = _kill_when_paused(job, tmp_path)

    result = finish(job, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert (summary["produced"], summary["done"], summary["failed"]) == (n, n, 0)
    assert summary["restarts"] >= 1
    assert set(local_jobs.handled(tmp_path)) == set(range(n))
    assert f"pid {victim}" in result.stderr


@pytest.mark.timeout(90)
def test_a_producer_killed_mid_put_ends_the_job_with_what_it_put(tmp_path: Path) -> None:
    job = start("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle", "--workers", "2",
                "--json", out=tmp_path, LJ_N="500", PCQ_TEST_PAUSE_AT="put",
                PCQ_TEST_PAUSE_FILE=str(tmp_path / "paused"))
    _kill_when_paused(job, tmp_path)

    result = finish(job, timeout=60)
    assert result.returncode == 1  # the producer failed
    summary = json.loads(result.stdout)
    assert summary["done"] == summary["produced"] and summary["failed"] == 0
    assert set(local_jobs.handled(tmp_path)) == set(range(summary["produced"]))


@pytest.mark.timeout(90)
def test_a_consumer_killed_while_idle_changes_nothing(tmp_path: Path) -> None:
    job = start("run", f"{JOBS}:produce_after_a_pause", f"{JOBS}:handle", "--workers", "2",
                "--json", out=tmp_path, LJ_N="200", LJ_PAUSE="1.5")
    # Given consumers waiting on an empty queue (the producer sleeps first)
    wait_for(lambda: len(session_members(job.pid, zombies=False)) >= 4,
             message="pcq run, 2 consumers and a producer up")
    time.sleep(0.3)  # let the consumers park in their take
    members = sorted(session_members(job.pid, zombies=False))
    children = [p for p in members if p != job.pid]
    # When one of them (not the producer: the highest pid was forked last) dies idle
    os.kill(children[0], signal.SIGKILL)

    result = finish(job, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["restarts"]) == (200, 1)
    assert sorted(local_jobs.handled(tmp_path)) == list(range(200))


# ---------------------------------------------------------------- class-style API


def _handle_sleep(item: Any) -> None:
    time.sleep(0.01)


def test_class_style_without_a_supervisor_recovers_a_killed_consumers_tasks() -> None:
    # Given a queue, a producer and two consumers the user starts and joins
    q = open_queue("local")
    try:
        consumers = [Consumer(q, _handle_sleep) for _ in range(2)]
        for c in consumers:
            c.start()
        producer = Producer(q, lambda: range(200))
        producer.start()
        wait_for(lambda: q.counters().in_flight > 0, message="tasks in flight")

        # When one consumer is SIGKILLed mid-task (nobody evicts or reaps it)
        assert consumers[0].pid is not None
        os.kill(consumers[0].pid, signal.SIGKILL)

        # Then the other consumer handles its tasks and everyone joins
        producer.join(30)
        assert q.join(timeout=30)
        consumers[1].join(30)
        consumers[0].join(5)
        assert (producer.exitcode, consumers[1].exitcode) == (0, 0)
        c = q.counters()
        assert (c.produced, c.done, c.pending) == (200, 200, 0)
    finally:
        q.dispose()


# ---------------------------------------------------------------- poison tasks


@pytest.mark.timeout(90)
def test_pcq_run_dead_letters_a_poison_task_and_handles_every_innocent_one(
    tmp_path: Path,
) -> None:
    n = 400
    result = finish(start("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle_poison",
                          "--workers", "2", "--json", out=tmp_path, LJ_N=str(n),
                          LJ_POISON="137"), timeout=60)

    assert result.returncode == 1, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert (summary["produced"], summary["done"], summary["failed"], summary["dead"]) == (
        n, n - 1, 1, 1), (summary, result.stderr[-3000:])
    # Three deaths (the default max_deliveries); the run may end before the
    # supervisor has noticed the third, which it then counts as no restart.
    assert summary["restarts"] in (2, 3)
    assert set(local_jobs.handled(tmp_path)) == set(range(n)) - {137}


def _poison_handler(item: int) -> None:
    if item == 42:
        os._exit(3)


def test_the_poison_tasks_dead_letter_says_why(tmp_path: Path) -> None:
    q: Queue = open_queue("local", max_deliveries=2)
    try:
        q.attach_producer()
        supervisor = Supervisor(q, lambda i: Consumer(q, _poison_handler), StageSettings(workers=2))
        supervisor.start()
        q.put_many(range(300))
        q.detach_producer()
        deadline = time.monotonic() + 60
        while not supervisor.done and time.monotonic() < deadline:
            supervisor.poll(wait(supervisor.sentinels(), 0.1))
            if q.state() == "idle":
                supervisor.stop(5)
        assert supervisor.done
        c = q.counters()
        assert (c.done, c.failed, c.dead, c.pending) == (299, 1, 1, 0)
        (letter,) = q.dead_letters()
        assert (letter["body"], letter["error"]) == (42, "consumer died 2 times while handling it")
    finally:
        q.dispose()


# ---------------------------------------------------------------- recovery latency


def _hold(q: Queue, report: Any) -> None:
    q.attach_consumer()
    lease = q.take(1, timeout=10)
    report.send(lease is not None)
    signal.pause()


def test_a_killed_consumers_task_is_back_within_milliseconds() -> None:
    q = open_queue("local")
    try:
        q.attach_consumer()
        latencies = []
        for n in range(20):
            q.put(n)
            mine, theirs = fork.Pipe(duplex=False)
            child = fork.Process(target=_hold, args=(q, theirs), daemon=True)
            child.start()
            assert mine.poll(10) and mine.recv()
            killed = time.monotonic()
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            lease = q.take(1, timeout=10)
            latencies.append(time.monotonic() - killed)
            assert lease is not None and [e.body for e in lease.envelopes()] == [n]
            q.ack(lease)
            child.join(5)
        median, worst = statistics.median(latencies), max(latencies)
        print(f"kill -> redelivery: median {median * 1e3:.2f} ms, max {worst * 1e3:.2f} ms "
              f"over {len(latencies)} kills")
        assert worst < 5  # never a reap interval; the figures above are the measure
    finally:
        q.dispose()
