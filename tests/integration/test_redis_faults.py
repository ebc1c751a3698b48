"""Redis faults with real servers and real `pcq` processes (issue #9): a restart
that loses the data, a dead host nobody waits for, a long outage, Ctrl-C under
backpressure.  The partition and TLS cases have files of their own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from apps.jobs import handled
from helpers import wait_for
from helpers_cli import pcq_env, session_pids, start_pcq
from redis_server import RedisServer

APP = "tests/apps/jobs.py"


@pytest.fixture
def volatile_server() -> Iterator[RedisServer]:
    """A private redis-server that keeps nothing on restart (no AOF, no RDB)."""
    server = RedisServer(appendonly=False).start()
    try:
        yield server
    finally:
        server.cleanup()


def consume(env: dict[str, str], *args: str, handler: str = "handle") -> subprocess.Popen[str]:
    return start_pcq(["consume", f"{APP}:{handler}", *args], env)


def produce(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return start_pcq(["produce", f"{APP}:produce", *args], env)


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pcq: error:")]


# -------------------------------------------------------- 1. restart without persistence


@pytest.mark.timeout(180)
def test_a_restart_that_loses_the_queue_fails_every_process_of_the_run(
    volatile_server: RedisServer, tmp_path: Path
) -> None:
    # Given a producer waiting for 100 slow tasks and a host of 3 consumers,
    # on a server without persistence
    env = pcq_env(volatile_server.url, tmp_path, JOBS_N="100", JOBS_SLEEP="0.05")
    name = env["PCQ_QUEUE"]
    host = consume(env, "--workers", "3")
    producer = produce(env, "--json")
    wait_for(lambda: len(handled(tmp_path)) >= 10, timeout=60, message="10 tasks handled")

    # When the server restarts mid-run (stop + start: it forgot everything)
    volatile_server.restart()

    # Then the producer and the host each exit 3 with one line that says so
    lost = f"the Redis server lost queue {name}'s data (restarted without persistence?)"
    for proc in (producer, host):
        code, out, err = finish(proc)
        assert code == 3, err
        assert error_lines(err) == [f"pcq: error: {lost}"], err
        assert "Traceback" not in err
        assert out == ""  # nothing printed a summary, nothing claims success
    # and both had warned, once each, that the server keeps nothing on restart
    assert len(handled(tmp_path)) < 100


@pytest.mark.timeout(60)
def test_a_server_without_persistence_is_warned_about_once(
    volatile_server: RedisServer, tmp_path: Path
) -> None:
    env = pcq_env(volatile_server.url, tmp_path, JOBS_N="5")
    volatile_server.client().config_set("maxmemory-policy", "allkeys-lru")
    host = consume(env, "--workers", "2")
    code, _, err = finish(produce(env))
    assert code == 0, err
    assert err.count("keeps nothing on restart") == 1, err
    assert err.count("maxmemory-policy allkeys-lru") == 1, err
    code, _, err = finish(host)
    assert code == 0, err
    assert err.count("keeps nothing on restart") == 1, err  # the host, not each worker


@pytest.mark.timeout(120)
def test_a_restart_with_persistence_is_no_loss(redis_server: RedisServer, tmp_path: Path) -> None:
    # Given the same job on a server with an append-only file
    env = pcq_env(redis_server.url, tmp_path, JOBS_N="100", JOBS_SLEEP="0.02")
    host = consume(env, "--workers", "3")
    producer = produce(env, "--json")
    wait_for(lambda: len(handled(tmp_path)) >= 10, timeout=60, message="10 tasks handled")
    # When it restarts mid-run
    redis_server.restart()
    # Then the job finishes as if nothing happened, and no one warned
    code, out, err = finish(producer)
    assert code == 0, err
    assert json.loads(out)["done"] == 100
    code, _, host_err = finish(host)
    assert code == 0, host_err
    assert Counter(handled(tmp_path)).keys() == set(range(100))
    assert "keeps nothing" not in err + host_err


# -------------------------------------------------------- 2. a dead host, no producer waiting


def live_consumers(client: redis.Redis, name: str) -> int:
    return int(client.zcount(f"pcq:{{{name}}}:consumers:beat", f"({time.time() * 1000}", "+inf"))


def started_by(out: Path, pids: set[int]) -> bool:
    return any((out / f"{pid}.started").exists() for pid in pids)


@pytest.mark.timeout(180)
def test_a_dead_hosts_tasks_are_finished_by_the_survivor_without_a_producer(
    redis_url: str, tmp_path: Path
) -> None:
    # Given two hosts of 3 workers each, on a heartbeat TTL of 2 s
    env = pcq_env(redis_url, tmp_path, JOBS_N="30", JOBS_SLEEP="0.3")
    name, client = env["PCQ_QUEUE"], redis.Redis.from_url(redis_url)
    options = ["--workers", "3", "--heartbeat-ttl", "2", "--json"]
    survivor = consume(env, *options, handler="handle_slow_first")
    doomed = consume(env, *options, handler="handle_slow_first")
    wait_for(lambda: live_consumers(client, name) == 6, timeout=60, message="6 consumers")
    # and a producer that puts 30 slow tasks, closes and leaves
    code, _, err = finish(produce(env, "--no-wait"))
    assert code == 0, err

    # When one host is SIGKILLed, process group and all, while it holds tasks
    doomed_pids = set(session_pids(doomed.pid)) - {doomed.pid}
    wait_for(lambda: started_by(tmp_path, doomed_pids), timeout=60, message="a doomed task")
    for pid in session_pids(doomed.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    doomed.wait(timeout=30)

    # Then the survivor alone finishes every task, without forking in a loop
    forked: set[int] = set()

    def survivor_exited() -> bool:
        forked.update(session_pids(survivor.pid))
        return survivor.poll() is not None

    wait_for(survivor_exited, timeout=90, message="the survivor to exit", interval=0.01)
    code, out, err = finish(survivor)
    assert code == 0, err
    assert json.loads(out)["restarts"] == 0
    assert len(forked - {survivor.pid}) <= 3 + 2, f"{len(forked)} processes: a fork loop"
    assert set(handled(tmp_path)) == set(range(30))
    counters = client.hgetall(f"pcq:{{{name}}}:counters")
    assert (int(counters[b"pending"]), int(counters[b"done"])) == (0, 30)


# ---------------------------------------------------------------- 4. interrupts under backpressure


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_producer_waiting_for_room_stops_at_the_first_signal(
    redis_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    # Given a producer of 100,000 tasks held back by --maxsize 10, no consumer
    env = pcq_env(redis_url, tmp_path, JOBS_N="100000")
    name, client = env["PCQ_QUEUE"], redis.Redis.from_url(redis_url)
    ready = f"pcq:{{{name}}}:ready"
    producer = produce(env, "--maxsize", "10", "--json")
    wait_for(lambda: client.llen(ready) >= 10, timeout=60, message="a full queue")

    # When it gets one signal
    sent = time.monotonic()
    producer.send_signal(sig)

    # Then it exits within the grace period with 128 + the signal
    code, out, err = finish(producer, timeout=30)
    assert time.monotonic() - sent < 5.0
    assert code == 128 + sig, err
    assert "Traceback" not in err
    assert json.loads(out)["produced"] == 10
    # and nothing more reached the server
    counters = client.hgetall(f"pcq:{{{name}}}:counters")
    assert (client.llen(ready), int(counters[b"produced"])) == (10, 10)


# ---------------------------------------------------------------- 3. a long outage


def outage_lines(stderr: str) -> tuple[int, int]:
    """How many 'link lost' and 'link back' lines ``stderr`` holds."""
    return stderr.count("pcq: lost the link to Redis"), stderr.count("is back after")


@pytest.mark.timeout(120)
def test_an_outage_longer_than_the_reconnect_timeout_is_one_line_and_exit_3(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Given a host and a waiting producer with a reconnect budget of 3 s
    env = pcq_env(redis_server.url, tmp_path, JOBS_N="200", JOBS_SLEEP="0.05",
                  PCQ_RECONNECT_TIMEOUT="3")
    host = consume(env, "--workers", "3")
    producer = produce(env)
    wait_for(lambda: len(handled(tmp_path)) >= 10, timeout=60, message="10 tasks handled")

    # When the server goes away for good
    redis_server.stop()
    gone = time.monotonic()

    # Then each says once that the link is lost, then gives up with one error line
    for proc in (host, producer):
        code, _, err = finish(proc, timeout=60)
        assert code == 3, err
        assert outage_lines(err) == (1, 0), err
        [line] = error_lines(err)
        assert "unreachable, retried 3 s" in line
        assert "Traceback" not in err
        assert len(err.splitlines()) <= 3, err  # the warning-free server: lost + error
    assert time.monotonic() - gone < 3 + 10  # the budget, a connect timeout, a grace


@pytest.mark.timeout(120)
def test_an_outage_within_the_reconnect_timeout_is_a_line_when_lost_and_one_when_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = pcq_env(redis_server.url, tmp_path, JOBS_N="100", JOBS_SLEEP="0.02",
                  PCQ_RECONNECT_TIMEOUT="30")
    host = consume(env, "--workers", "3")
    producer = produce(env, "--json")
    wait_for(lambda: len(handled(tmp_path)) >= 10, timeout=60, message="10 tasks handled")
    # When the server is away for a second and comes back with its data
    redis_server.stop()
    time.sleep(1.0)  # the outage itself (what the test is about), not a wait for a condition
    redis_server.start()
    # Then the job finishes and each process said "lost" once and "back" once
    code, out, err = finish(producer)
    assert code == 0, err
    assert json.loads(out)["done"] == 100
    assert outage_lines(err) == (1, 1), err
    code, _, err = finish(host)
    assert code == 0, err
    assert outage_lines(err) == (1, 1), err
    assert "Traceback" not in err
