"""Queue runs, poison tasks and busy handlers on a real redis-server, with real
`pcq` processes (issue #8): back-to-back runs with consumers started first,
--burst, a task that kills its consumers, a handler that holds the GIL past the
heartbeat TTL, and one that swallows its timeout."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import redis
from apps.jobs import handled
from helpers import wait_for
from helpers_cli import PCQ, pcq_env, start_pcq

APP = "tests/apps/jobs.py"


def consume(env: dict[str, str], *args: str, handler: str = "handle") -> subprocess.Popen[str]:
    return start_pcq(["consume", f"{APP}:{handler}", "--json", *args], env)


def produce(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return start_pcq(["produce", f"{APP}:produce", "--json", *args], env)


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def status(env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([*PCQ, "status", "--json"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def consumers_attached(env: dict[str, str], count: int) -> None:
    # Read from the server: `pcq status` refuses a queue no one has used yet.
    client = redis.Redis.from_url(env["PCQ_URL"])
    registered = f"pcq:{{{env['PCQ_QUEUE']}}}:consumers"
    wait_for(lambda: client.hlen(registered) == count, timeout=60,
             message=f"{count} consumers attached")


def dead_letters(env: dict[str, str]) -> list[dict[str, object]]:
    proc = subprocess.run([*PCQ, "dead", "list", "--json"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.timeout(300)
def test_back_to_back_runs_on_one_queue_with_consumers_started_first(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="100")
    for run in range(3):
        # Given two consumer hosts started before the producer (a cron job)
        hosts = [consume(env, "--workers", "2") for _ in range(2)]
        consumers_attached(env, 4)
        # When the producer of this run puts its tasks
        code, out, err = finish(produce({**env, "JOBS_START": str(run * 100)}))
        # Then it sees them all done, and every consumer exits 0
        assert code == 0, err
        assert json.loads(out)["done"] == 100
        for host in hosts:
            code, out, err = finish(host)
            assert code == 0, err
            if run:  # the queue was idle when they came: they said they wait
                assert err.count("waiting for a producer") == 1, err
        assert status(env)["state"] == "idle"
    assert Counter(handled(tmp_path)) == Counter(range(300))


@pytest.mark.timeout(300)
def test_a_consumer_started_after_a_finished_run_serves_the_next(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="30")
    # Given a finished run
    host = consume(env, "--workers", "2")
    assert finish(produce(env))[0] == 0
    assert finish(host)[0] == 0
    assert status(env)["state"] == "idle"
    # When a consumer starts on the idle queue, it stays, waiting
    late = consume(env, "--workers", "2")
    consumers_attached(env, 2)
    assert late.poll() is None
    # Then it serves the next run and exits 0 at its end
    code, out, err = finish(produce({**env, "JOBS_START": "30"}))
    assert code == 0, err
    code, out, err = finish(late)
    assert code == 0, err
    assert json.loads(out)["done"] == 30
    assert sorted(handled(tmp_path)) == list(range(60))


@pytest.mark.timeout(300)
def test_burst_consumers_exit_when_nothing_is_left_and_no_producer_is_attached(
    redis_url, tmp_path
):
    env = pcq_env(redis_url, tmp_path, JOBS_N="40")
    # An idle (here: new) queue: a burst consumer exits at once
    code, out, err = finish(consume(env, "--burst"), timeout=60)
    assert code == 0, err
    assert "waiting" not in err
    # Tasks left on an open queue by a producer that is gone: drained, then exit 0
    assert finish(produce(env, "--no-wait", "--no-close"))[0] == 0
    assert status(env)["state"] == "open"
    code, out, err = finish(consume(env, "--burst", "--workers", "2"))
    assert code == 0, err
    assert json.loads(out)["done"] == 40
    assert sorted(handled(tmp_path)) == list(range(40))


def _assert_poisoned(env: dict[str, str], tmp_path: Path, n: int, poison: int) -> None:
    innocent = Counter(handled(tmp_path))
    assert set(innocent) == set(range(n)) - {poison}  # every innocent task, at least once
    (letter,) = dead_letters(env)
    assert letter["body"] == poison
    assert letter["error"] == "consumer died 3 times while handling it"


@pytest.mark.timeout(300)
def test_pcq_run_dead_letters_a_poison_task_and_handles_every_innocent_one(
    redis_url, tmp_path
):
    # Given 300 tasks, one of which kills whichever consumer runs it
    env = pcq_env(redis_url, tmp_path, JOBS_N="300", JOBS_POISON="137")
    proc = start_pcq(["run", f"{APP}:produce", f"{APP}:handle_poison", "--workers", "2",
                      "--backend", "redis", "--url", redis_url, "--queue", env["PCQ_QUEUE"],
                      "--json"], env)
    # When the job runs to its end
    code, out, err = finish(proc, timeout=240)
    # Then it ends, exit 1: one task failed (dead-lettered), the rest done
    assert code == 1, err
    summary = json.loads(out)
    assert (summary["failed"], summary["done"]) == (1, 299)
    assert 3 <= summary["restarts"] <= 4  # three deaths; no crash loop
    _assert_poisoned(env, tmp_path, 300, 137)


@pytest.mark.timeout(300)
def test_consume_hosts_survive_a_poison_task_and_produce_exits_1(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="400", JOBS_POISON="250")
    hosts = [consume(env, "--workers", "2", handler="handle_poison") for _ in range(2)]
    consumers_attached(env, 4)
    code, out, err = finish(produce(env), timeout=240)
    assert code == 1, err
    summary = json.loads(out)
    assert (summary["failed"], summary["done"]) == (1, 399)
    restarts = 0
    for host in hosts:
        code, out, err = finish(host)
        assert code in (0, 1), err  # the host that dead-lettered it reports a failure
        restarts += json.loads(out)["restarts"]
    assert restarts == 3
    _assert_poisoned(env, tmp_path, 400, 250)


@pytest.mark.timeout(300)
def test_a_handler_holding_the_gil_past_the_ttl_is_neither_reaped_nor_duplicated(
    redis_url, tmp_path
):
    # Given a heartbeat TTL of 1 s and handlers that hold the GIL for 3 s
    env = pcq_env(redis_url, tmp_path, JOBS_N="4", JOBS_GIL_SECONDS="3",
                  PCQ_HEARTBEAT_TTL="1")
    host = consume(env, "--workers", "2", handler="handle_gil")
    consumers_attached(env, 2)
    beats = f"pcq:{{{env['PCQ_QUEUE']}}}:consumers:beat"
    client = redis.Redis.from_url(redis_url)
    # When a producer puts four such tasks and waits
    proc = produce(env)
    # (meanwhile the consumers stay registered: their supervisor vouches for them)
    wait_for(lambda: status(env)["in_flight"] == 2, timeout=60, message="both busy")
    assert client.zcard(beats) == 2
    code, out, err = finish(proc, timeout=200)
    # Then every task is done once, by the consumers that took it first
    assert code == 0, err
    assert json.loads(out)["done"] == 4
    code, out, err = finish(host)
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["done"], summary["restarts"]) == (4, 0)
    assert sorted(handled(tmp_path)) == [0, 1, 2, 3]


@pytest.mark.timeout(300)
def test_a_handler_that_swallows_its_timeout_fails_and_is_killed(redis_url, tmp_path):
    # Given task 5 catches the TaskTimeout and then hangs
    env = pcq_env(redis_url, tmp_path, JOBS_N="20", JOBS_POISON="5", JOBS_AFTER="600")
    proc = start_pcq(["run", f"{APP}:produce", f"{APP}:handle_swallow", "--workers", "2",
                      "--timeout", "0.5", "--retries", "1", "--backend", "redis",
                      "--url", redis_url, "--queue", env["PCQ_QUEUE"], "--json"], env)
    # Then its consumer is killed past timeout + grace, twice (one retry), the
    # task is dead-lettered as a timeout (no death counted), the job ends with 1
    code, out, err = finish(proc, timeout=200)
    assert code == 1, err
    summary = json.loads(out)
    assert (summary["done"], summary["failed"], summary["retried"]) == (19, 1, 1)
    assert summary["restarts"] == 2
    (letter,) = dead_letters(env)
    assert letter["body"] == 5 and "TaskTimeout" in str(letter["error"])
    assert set(handled(tmp_path)) == set(range(20)) - {5}  # at least once


@pytest.mark.timeout(300)
def test_a_handler_that_swallows_its_timeout_and_returns_still_fails(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="10", JOBS_POISON="3", JOBS_AFTER="0.2")
    host = consume(env, "--workers", "2", "--timeout", "0.3", handler="handle_swallow")
    code, out, err = finish(produce(env))
    assert code == 1, err
    assert (json.loads(out)["done"], json.loads(out)["failed"]) == (9, 1)
    code, out, err = finish(host)
    summary = json.loads(out)
    assert (summary["done"], summary["failed"], summary["restarts"]) == (9, 1, 0)
    (letter,) = dead_letters(env)
    assert letter["body"] == 3 and "TaskTimeout" in str(letter["error"])


@pytest.mark.timeout(300)
def test_a_crash_loop_restarts_consumers_with_a_backoff_and_ends(redis_url, tmp_path):
    # Given a handler that kills every consumer, on every task
    env = pcq_env(redis_url, tmp_path, JOBS_N="6")
    proc = start_pcq(["run", f"{APP}:produce", f"{APP}:handle_dies", "--workers", "2",
                      "--max-deliveries", "2", "--backend", "redis", "--url", redis_url,
                      "--queue", env["PCQ_QUEUE"], "--json"], env)
    code, out, err = finish(proc, timeout=240)
    # Then the job ends: every task dead-lettered after two deaths, exit 1
    assert code == 1, err
    summary = json.loads(out)
    assert (summary["done"], summary["failed"]) == (0, 6)
    assert all(d["error"] == "consumer died 2 times while handling it"
               for d in dead_letters(env))
    # and the restarts were spaced out: delays of 0, 0.1, 0.2, 0.4 s ... up to 5 s,
    # so the last restart alone waited min(5, 0.1 * 2**(restarts - 2)) s
    restarts = summary["restarts"]
    assert 7 <= restarts <= 12
    assert summary["elapsed_s"] > min(5.0, 0.1 * 2 ** (restarts - 2))
    assert restarts / summary["elapsed_s"] < 5


@pytest.mark.timeout(300)
def test_pcq_consume_counts_a_task_killed_past_its_timeout_as_failed(redis_url, tmp_path):
    env = pcq_env(redis_url, tmp_path, JOBS_N="8", JOBS_POISON="2", JOBS_AFTER="600")
    host = consume(env, "--workers", "2", "--timeout", "0.5", handler="handle_swallow")
    code, out, err = finish(produce(env))
    assert code == 1, err
    assert (json.loads(out)["done"], json.loads(out)["failed"]) == (7, 1)
    code, out, err = finish(host)
    summary = json.loads(out)
    assert (summary["done"], summary["failed"], summary["restarts"]) == (7, 1, 1)


@pytest.mark.timeout(300)
def test_a_poison_task_with_concurrent_consumers_takes_no_innocent_one_down(
    redis_url, tmp_path
):
    # Consumers that run several tasks at once: a suspect is only taken by a
    # consumer holding nothing else, so no innocent task dies beside it twice
    env = pcq_env(redis_url, tmp_path, JOBS_N="300", JOBS_POISON="77")
    proc = start_pcq(["run", f"{APP}:produce", f"{APP}:handle_poison", "--workers", "2",
                      "--concurrency", "4", "--max-deliveries", "2", "--backend", "redis",
                      "--url", redis_url, "--queue", env["PCQ_QUEUE"], "--json"], env)
    code, out, err = finish(proc, timeout=240)
    assert code == 1, err
    summary = json.loads(out)
    assert (summary["failed"], summary["done"]) == (1, 299)
    assert set(handled(tmp_path)) == set(range(300)) - {77}
    (letter,) = dead_letters(env)
    assert (letter["body"], letter["error"]) == (77, "consumer died 2 times while handling it")
