"""The Redis protocol review (issue #15), against a real redis-server and real
`pcq` processes: each test sets up the exact point the review names (a purge
under a busy consumer, a host killed while the others are busy, a FLUSHDB
mid-run, ...) and checks that nothing is stranded, nothing hangs and no run
that lost its data reports success."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from apps.jobs import handled
from apps.protocol_jobs import started
from helpers import wait_for
from helpers_cli import PCQ, ROOT, pcq_env, session_pids, start_pcq

from pcq.backends.redis import RedisQueue

APP = "tests/apps/protocol_jobs.py"
JOBS = "tests/apps/jobs.py"


def hold(out: Path, *tasks: int) -> None:
    for task in tasks:
        (out / f"hold-{task}").touch()


def let_go(out: Path, *tasks: int) -> None:
    for task in tasks:
        (out / f"hold-{task}").unlink(missing_ok=True)


def pcq(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PCQ, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def put(env: dict[str, str], first: int, n: int = 1) -> None:
    """Put tasks first .. first+n-1 and leave the queue open."""
    done = pcq({**env, "JOBS_START": str(first), "JOBS_N": str(n)},
               "produce", f"{JOBS}:produce", "--no-close", "--no-wait")
    assert done.returncode == 0, done.stderr


def consume(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return start_pcq(["consume", f"{APP}:handle_held", "--workers", "1", *args], env)


def kill_session(proc: subprocess.Popen[str]) -> None:
    for pid in session_pids(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


# ------------------------------------------- 3. what the in-flight list holds decides


def blocked_in_blmove(server: redis.Redis) -> bool:
    clients = cast("list[dict[str, Any]]", server.client_list())
    return any(c.get("cmd") == "blmove" for c in clients)


@pytest.mark.timeout(30)
def test_a_task_moved_into_a_purged_in_flight_list_is_handed_out(redis_url: str) -> None:
    # Given a consumer that holds one lease and waits in BLMOVE for the next
    name = f"t-{uuid.uuid4().hex[:10]}"
    consumer, other = RedisQueue(name, url=redis_url), RedisQueue(name, url=redis_url)
    server = redis.Redis.from_url(redis_url)
    try:
        consumer.attach_consumer()
        other.put(0)
        first = consumer.take(1, timeout=5)
        assert first is not None
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(consumer.take, 1, 5.0)
            wait_for(lambda: blocked_in_blmove(server), timeout=5, message="a BLMOVE")

            # When a purge empties its in-flight list and a new task is put, which
            # the waiting BLMOVE moves into that list (one message, as before)
            other.purge()
            other.put(1)
            lease = waiting.result(timeout=10)

        # Then the new task is handed out, not stranded
        assert lease is not None and [e.body for e in lease.envelopes()] == [1]
        assert consumer.ack(lease)
        assert not consumer.ack(first)  # purged: stale
        assert other.counters().pending == 0
    finally:
        for q in (consumer, other):
            q.forget()
            q.dispose()
        server.close()


@pytest.mark.timeout(30)
def test_a_lease_left_in_flight_by_a_lost_ack_write_is_handed_out_again(redis_url: str) -> None:
    # Given a consumer that acknowledged task 0, holding task 1
    name = f"t-{uuid.uuid4().hex[:10]}"
    q = RedisQueue(name, url=redis_url)
    server = redis.Redis.from_url(redis_url)
    try:
        q.attach_consumer()
        q.put_many([0, 1])
        first, second = q.take(1, timeout=5), q.take(1, timeout=5)
        assert first is not None and second is not None
        (message,) = first.receipt.messages
        assert q.ack(first)

        # When the server forgets that ack's write (an AOF-everysec crash, a
        # failover to a lagging replica): task 0 is back in the in-flight list
        server.rpush(q.keys.inflight(first.receipt.consumer), message)
        server.hincrby(q.keys.counters, "pending", 1)

        # Then the next take hands task 0 out again (not task 1, which it holds)
        again = q.take(1, timeout=5)
        assert again is not None and [e.body for e in again.envelopes()] == [0]
        assert q.ack(again) and q.ack(second)
        assert q.counters().pending == 0 and q.counters().in_flight == 0
    finally:
        q.forget()
        q.dispose()
        server.close()


@pytest.mark.timeout(30)
def test_a_reaped_suspect_goes_out_while_every_consumer_is_busy(
    redis_url: str, tmp_path: Path
) -> None:
    # Given host B holding task 1 and host A (concurrency 2) holding task 0
    env = pcq_env(redis_url, tmp_path)
    ttl = ["--heartbeat-ttl", "1"]
    hold(tmp_path, 0, 1)
    b = consume(env, *ttl)
    put(env, 1)
    wait_for(lambda: started(tmp_path) == [1], timeout=10, message="B started task 1")
    a = consume(env, "--concurrency", "2", *ttl)
    put(env, 0)
    wait_for(lambda: sorted(started(tmp_path)) == [0, 1], timeout=10, message="A started 0")

    # When host B dies (its heartbeat lapses: task 1 becomes a suspect)
    kill_session(b)
    let_go(tmp_path, 1)

    # Then A's free slot runs the suspect although A holds task 0
    wait_for(lambda: 1 in handled(tmp_path), timeout=10, message="suspect 1 handled")
    let_go(tmp_path, 0)
    assert pcq(env, "close").returncode == 0
    assert a.wait(timeout=10) == 0
    assert sorted(handled(tmp_path)) == [0, 1]
