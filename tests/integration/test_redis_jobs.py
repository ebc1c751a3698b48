"""Multi-host jobs on a real redis-server: several `pcq consume` supervisors
(each standing in for a host) and `pcq produce`, as separate processes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis
from apps.jobs import handled
from helpers import wait_for
from helpers_cli import PCQ, STARTED, pcq_env, session_pids, start_pcq

APP = "tests/apps/jobs.py"


def consume(env: dict[str, str], *args: str, handler: str = "handle") -> subprocess.Popen[str]:
    return start_pcq(["consume", f"{APP}:{handler}", *args], env)


def produce(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return start_pcq(["produce", f"{APP}:produce", *args], env)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.timeout(120)
def test_two_hosts_one_producer_every_item_once_and_everyone_exits(redis_url, tmp_path):
    # Given two consumer hosts with three workers each
    env = pcq_env(redis_url, tmp_path, JOBS_N="300")
    hosts = [consume(env, "--workers", "3") for _ in range(2)]
    # (both attached before the run: a host that comes after the run has finished
    # waits for the next one, since idle is new)
    consumers = f"pcq:{{{env['PCQ_QUEUE']}}}:consumers"
    wait_for(lambda: redis.Redis.from_url(redis_url).hlen(consumers) == 6, timeout=60)
    # When one producer puts 300 tasks and waits
    code, out, err = finish(produce(env, "--json"))
    # Then it reports every task done and exits 0 ...
    assert code == 0, err
    summary = json.loads(out)
    assert summary["produced"] == 300 and summary["done"] == 300 and summary["failed"] == 0
    # ... every consumer host exits 0 on its own, after its workers took their sentinels
    for host in hosts:
        assert finish(host)[0] == 0
    # ... and every item was handled exactly once
    assert Counter(handled(tmp_path)) == Counter(range(300))


@pytest.mark.timeout(120)
def test_consumers_started_after_the_producer_finish_the_job(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="50")
    # Given a producer that puts everything and closes before any consumer exists
    code, out, err = finish(produce(env, "--no-wait", "--json"))
    assert code == 0, err
    assert json.loads(out)["produced"] == 50
    # When a consumer host starts after close
    code, _, err = finish(consume(env, "--workers", "2"))
    # Then it handles what is left and exits 0 when the queue is drained
    assert code == 0, err
    assert sorted(handled(tmp_path)) == list(range(50))


@pytest.mark.timeout(120)
def test_two_producers_the_last_to_finish_closes(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="100", JOBS_START="100")
    producers = f"pcq:{{{env['PCQ_QUEUE']}}}:producers"
    client = redis.Redis.from_url(redis_url)
    host = consume(env, "--workers", "2")
    # Given a producer reading stdin, still running
    slow = subprocess.Popen([*PCQ, "produce", "-"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    STARTED.append(slow)
    assert slow.stdin is not None
    slow.stdin.write("".join(f"{n}\n" for n in range(50)))
    slow.stdin.flush()
    wait_for(lambda: client.hlen(producers) >= 1, timeout=30)
    # When a second producer comes and goes
    assert finish(produce(env))[0] == 0
    # Then the queue is still open: the consumers go on with the first's tasks
    slow.stdin.write("".join(f"{n}\n" for n in range(50, 100)))
    slow.stdin.close()
    # and close only when the first, the last producer, is done
    assert slow.wait(timeout=60) == 0
    assert finish(host)[0] == 0
    assert sorted(handled(tmp_path)) == list(range(200))


@pytest.mark.timeout(120)
def test_produce_from_stdin_json_lines(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path)
    host = consume(env, "--workers", "2", handler="handle")
    lines = "".join(json.dumps(x) + "\n" for x in [1, None, "two", [3], {"four": 4}])
    proc = subprocess.run([*PCQ, "produce", "-", "--json"], input=lines, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == 5
    assert finish(host)[0] == 0
    assert sorted(map(json.dumps, handled(tmp_path))) == sorted(
        json.dumps(x) for x in [1, None, "two", [3], {"four": 4}])


@pytest.mark.timeout(120)
def test_bad_json_line_on_stdin_is_one_clear_error(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path)
    proc = subprocess.run([*PCQ, "produce", "-", "--no-wait"], input='1\n2\n{oops\n',
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "line 3" in proc.stderr and "Traceback" not in proc.stderr
    # the two good lines were put, not lost
    status = subprocess.run([*PCQ, "status", "--json"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert json.loads(status.stdout)["ready"] == 2


@pytest.mark.timeout(120)
def test_worker_killed_mid_task_its_task_is_redelivered(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="6", JOBS_SLEEP="1.0")
    host = consume(env, "--workers", "2", "--json", handler="handle_slow_first")
    producer = produce(env, "--json")
    # When a worker has started a task, kill it
    started = wait_for(lambda: sorted(tmp_path.glob("*.started")), timeout=30)
    victim = int(started[0].stem)
    os.kill(victim, signal.SIGKILL)
    # Then the job still completes with every task done
    code, out, err = finish(producer)
    assert code == 0, err
    assert json.loads(out)["done"] == 6
    code, out, _ = finish(host)
    assert code == 0
    assert json.loads(out)["restarts"] >= 1
    assert set(handled(tmp_path)) == set(range(6))
    assert not (tmp_path / f"{victim}.log").exists()  # it never finished its task


@pytest.mark.timeout(120)
def test_a_whole_host_killed_its_tasks_come_back_within_the_heartbeat_ttl(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="8", JOBS_SLEEP="0.5", PCQ_HEARTBEAT_TTL="1.5")
    # Given a doomed host that takes tasks and a producer
    doomed = consume(env, "--workers", "2", handler="handle_slow_first")
    producer = produce(env)
    wait_for(lambda: list(tmp_path.glob("*.started")), timeout=30)
    # When the whole host disappears (its process group killed, no goodbye)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=10)
    wait_for(lambda: not session_pids(doomed.pid), timeout=10)
    # Then a healthy host started afterwards gets the doomed host's tasks back
    survivor = consume(env, "--workers", "2")
    assert finish(producer)[0] == 0
    assert finish(survivor)[0] == 0
    assert set(handled(tmp_path)) == set(range(8))


@pytest.mark.timeout(120)
def test_stale_sentinels_never_stop_a_later_run(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="5")
    ready = f"pcq:{{{env['PCQ_QUEUE']}}}:ready"
    client = redis.Redis.from_url(redis_url)
    # Given a first run whose consumer host died without a goodbye, and a close
    # that still counted its two workers live (their heartbeats are fresh): two
    # sentinels nobody will ever take
    host = consume(env, "--workers", "2")
    assert finish(produce(env, "--no-close"))[0] == 0
    os.killpg(host.pid, signal.SIGKILL)
    host.wait(timeout=10)
    subprocess.run([*PCQ, "close"], env=env, check=True, capture_output=True, timeout=30)
    assert client.llen(ready) == 2
    # When the consumers of a second run on the same queue name start first (the
    # queue is idle: they wait) and its producer puts its tasks behind them
    (tmp_path / "run2").mkdir()
    env2 = {**env, "JOBS_OUT": str(tmp_path / "run2"), "JOBS_START": "100", "JOBS_N": "40"}
    old = set(client.hkeys(f"pcq:{{{env['PCQ_QUEUE']}}}:consumers"))
    hosts = [consume(env2, "--workers", "2") for _ in range(2)]
    wait_for(lambda: len(set(client.hkeys(f"pcq:{{{env['PCQ_QUEUE']}}}:consumers")) - old) == 4,
             timeout=60, message="the second run's consumers attached")
    producer = produce(env2, "--json")
    # Then its consumers skip the stale sentinels and handle every task
    code, out, err = finish(producer)
    assert code == 0, err
    assert json.loads(out)["done"] == 40
    for host in hosts:
        assert finish(host)[0] == 0
    assert sorted(handled(tmp_path / "run2")) == list(range(100, 140))


@pytest.mark.timeout(120)
def test_garbage_and_pickles_are_dead_lettered_never_executed(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="3")
    queue = env["PCQ_QUEUE"]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    client = redis.Redis.from_url(redis_url)
    ready = f"pcq:{{{queue}}}:ready"
    client.lpush(ready, b"\x00\xffgarbage", pickle.dumps(Evil()), b"")
    host = consume(env, "--workers", "1")
    code, out, err = finish(produce(env, "--json"))
    assert code == 0, err
    assert json.loads(out)["done"] == 3
    assert finish(host)[0] == 0
    assert sorted(handled(tmp_path)) == [0, 1, 2]
    assert not marker.exists()
    dead = subprocess.run([*PCQ, "dead", "list", "--json"], env=env, capture_output=True,
                          text=True, timeout=30)
    letters = [json.loads(line) for line in dead.stdout.splitlines()]
    assert len(letters) == 3
    assert all(letter["error"] for letter in letters)


@pytest.mark.timeout(120)
def test_failed_tasks_are_retried_then_dead_and_requeue_brings_them_back(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="20")
    host = consume(env, "--workers", "2", "--retries", "1", handler="handle_failing")
    code, out, err = finish(produce(env, "--json"))
    assert code == 1, err  # some tasks failed
    summary = json.loads(out)
    assert summary["failed"] == 4 and summary["done"] == 16 and summary["retried"] == 4
    assert finish(host)[0] == 1
    dead = subprocess.run([*PCQ, "dead", "list", "--json"], env=env, capture_output=True,
                          text=True, timeout=30, check=True)
    letters = [json.loads(line) for line in dead.stdout.splitlines()]
    assert sorted(letter["body"] for letter in letters) == [0, 5, 10, 15]
    assert all("ValueError: unlucky" in letter["error"] for letter in letters)
    assert all("Traceback" in letter["traceback"] for letter in letters)
    requeued = subprocess.run([*PCQ, "dead", "requeue"], env=env, capture_output=True,
                              text=True, timeout=30)
    assert requeued.returncode == 0 and "4" in requeued.stderr


@pytest.mark.timeout(180)
def test_server_restart_mid_run_loses_nothing(redis_server, tmp_path):
    url = redis_server.url
    env = pcq_env(url, tmp_path, JOBS_N="400", JOBS_SLEEP="0.005")
    host = consume(env, "--workers", "2")
    producer = produce(env, "--json")
    wait_for(lambda: len(handled(tmp_path)) >= 50, timeout=60)
    # When the server restarts (appendonly on: the data survives)
    redis_server.restart()
    code, out, err = finish(producer, timeout=120)
    assert code == 0, err
    assert json.loads(out)["produced"] == 400
    assert finish(host, timeout=120)[0] == 0
    # Then every task was handled (at least once)
    assert set(handled(tmp_path)) == set(range(400))


@pytest.mark.timeout(60)
def test_status_reports_counters_and_consumers(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="10", JOBS_SLEEP="5")
    host = consume(env, "--workers", "2")
    assert finish(produce(env, "--no-wait", "--no-close"))[0] == 0
    wait_for(lambda: json.loads(subprocess.run(
        [*PCQ, "status", "--json"], env=env, capture_output=True, text=True, timeout=30
    ).stdout)["in_flight"] >= 1, timeout=30)
    status = json.loads(subprocess.run([*PCQ, "status", "--json"], env=env,
                                       capture_output=True, text=True, timeout=30).stdout)
    assert status["consumers"] == 2 and status["pending"] == 10 and status["closed"] is False
    assert {c["pid"] for c in status["consumer_list"]} <= set(session_pids(host.pid))
    text = subprocess.run([*PCQ, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert "pending" in text.stdout and "consumer" in text.stdout
    host.send_signal(signal.SIGTERM)
    assert finish(host)[0] == 143


@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "redis://no-such-host.invalid:6379",
                                 "redis://127.0.0.1:notaport/0", "http://example/0"])
def test_unreachable_or_bad_url_is_one_line_and_exit_2(url, tmp_path):
    env = pcq_env(url, tmp_path)
    for args in (["consume", f"{APP}:handle"], ["produce", f"{APP}:produce"], ["status"]):
        proc = subprocess.run([*PCQ, *args], env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.timeout(120)
def test_pcq_run_on_redis_does_the_whole_job(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="200")
    proc = subprocess.run([*PCQ, "run", f"{APP}:produce", f"{APP}:handle", "--workers", "3",
                           "--json"], env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == 200
    assert Counter(handled(tmp_path)) == Counter(range(200))


def test_python_is_this_interpreter():
    assert PCQ[0] == sys.executable and Path(PCQ[0]).exists()
