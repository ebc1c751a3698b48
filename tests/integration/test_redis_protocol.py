"""The Redis protocol review (issue #15), against a real redis-server and real
`pcq` processes: each test sets up the exact point the review names (a purge
under a busy consumer, a host killed while the others are busy, a FLUSHDB
mid-run, ...) and checks that nothing is stranded, nothing hangs and no run
that lost its data reports success."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from apps.jobs import handled
from apps.protocol_jobs import started
from helpers import wait_for
from helpers_cli import PCQ, ROOT, pcq_env, session_pids, start_pcq
from redis.crc import key_slot
from redis_server import RedisServer

from pcq.backends.base import Failure
from pcq.backends.redis import RedisQueue
from pcq.backends.redis_link import load_script
from pcq.envelope import Envelope, encode_envelope, new_tag
from pcq.pipeline import stage_queue

APP = "tests/apps/protocol_jobs.py"
JOBS = "tests/apps/jobs.py"


def hold(out: Path, *tasks: int) -> None:
    for task in tasks:
        (out / f"hold-{task}").touch()


def let_go(out: Path, *tasks: int) -> None:
    for task in tasks:
        (out / f"hold-{task}").unlink(missing_ok=True)


def pcq(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
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
def test_an_idle_consumer_runs_the_task_it_wakes_for_with_no_round_trip_more(
    redis_url: str,
) -> None:
    # Given a consumer waiting on an empty queue, its take.lua calls counted
    name = f"t-{uuid.uuid4().hex[:10]}"
    consumer, other = RedisQueue(name, url=redis_url), RedisQueue(name, url=redis_url)
    server = redis.Redis.from_url(redis_url)
    takes: list[int] = []
    real = consumer._take_once
    consumer._take_once = lambda me, want: (takes.append(want), real(me, want))[1]  # type: ignore[method-assign]
    try:
        consumer.attach_consumer()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(consumer.take, 5, 5.0)
            wait_for(lambda: blocked_in_blmove(server), timeout=5, message="a BLMOVE")

            # When a task is put
            other.put("wake")
            lease = waiting.result(timeout=10)

        # Then the wait itself delivered it: no take after the wake, the task in
        # the consumer's landing list, still counted ready until a script looks
        assert lease is not None and [e.body for e in lease.envelopes()] == ["wake"]
        assert takes == [5]  # the one before the wait
        me = consumer._consumer_id
        assert me is not None and server.llen(other.keys.landing(me)) == 1
        c = other.counters()
        assert (c.ready, c.in_flight, c.pending) == (0, 1, 1)
        # and its ack counts it once, out of the landing list
        assert consumer.ack(lease)
        c = other.counters()
        assert (c.ready, c.in_flight, c.pending, c.done) == (0, 0, 0, 1)
        assert server.llen(other.keys.landing(me)) == 0
        assert int(server.hget(other.keys.counters, "queued") or 0) == 0
    finally:
        for q in (consumer, other):
            q.forget()
            q.dispose()
        server.close()


@pytest.mark.timeout(60)
def test_a_consumer_killed_running_a_task_it_woke_for_loses_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    # Given an idle consumer host that woke for task 0 and runs it (held): the
    # task is in its landing list, no take.lua ran since the put
    env = pcq_env(redis_url, tmp_path)
    server = redis.Redis.from_url(redis_url)
    hold(tmp_path, 0)
    a = consume(env, "--heartbeat-ttl", "1")
    wait_for(lambda: blocked_in_blmove(server), timeout=30, message="A waits")
    put(env, 0)
    wait_for(lambda: started(tmp_path) == [0], timeout=30, message="A started task 0")
    landing = f"pcq:{{{env['PCQ_QUEUE']}}}:landing:*"
    assert sum(cast(int, server.llen(k)) for k in server.scan_iter(match=landing)) == 1

    # When host A is SIGKILLed and host B starts
    kill_session(a)
    let_go(tmp_path, 0)
    b = consume(env, "--heartbeat-ttl", "1")

    # Then B runs task 0 (a suspect: A died with it), once, and the run ends clean
    wait_for(lambda: handled(tmp_path) == [0], timeout=30, message="B handled task 0")
    assert pcq(env, "close").returncode == 0
    assert b.wait(timeout=30) == 0
    assert started(tmp_path) == [0, 0]
    status = json.loads(pcq(env, "status", "--json").stdout)
    assert (status["done"], status["pending"], status["ready"]) == (1, 0, 0)
    assert not list(server.scan_iter(match=landing))
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


@pytest.mark.timeout(90)
def test_a_reaped_suspect_goes_out_while_every_consumer_is_busy(
    redis_url: str, tmp_path: Path
) -> None:
    # Given host B holding task 1 and host A (concurrency 2) holding task 0
    env = pcq_env(redis_url, tmp_path)
    ttl = ["--heartbeat-ttl", "1"]
    hold(tmp_path, 0, 1)
    b = consume(env, *ttl)
    put(env, 1)
    wait_for(lambda: started(tmp_path) == [1], timeout=30, message="B started task 1")
    a = consume(env, "--concurrency", "2", *ttl)
    put(env, 0)
    wait_for(lambda: sorted(started(tmp_path)) == [0, 1], timeout=30, message="A started 0")

    # When host B dies (its heartbeat lapses: task 1 becomes a suspect)
    kill_session(b)
    let_go(tmp_path, 1)

    # Then the server hands the suspect to A's free slot although A holds task 0
    # (before: suspects went only to a consumer holding nothing, so one that is
    # never idle starved them).  A starts it once task 0 is done: a suspect runs
    # alone in its process, so a poison task takes no innocent one with it.
    server = redis.Redis.from_url(redis_url)
    inflight = f"pcq:{{{env['PCQ_QUEUE']}}}:inflight:*"

    def held_by_a() -> int:
        return sum(cast(int, server.llen(k)) for k in server.scan_iter(match=inflight))

    wait_for(lambda: held_by_a() == 2, timeout=30, message="A took the suspect")
    assert 1 not in handled(tmp_path)
    let_go(tmp_path, 0)
    wait_for(lambda: 1 in handled(tmp_path), timeout=30, message="suspect 1 handled")
    assert pcq(env, "close").returncode == 0
    assert a.wait(timeout=30) == 0
    assert sorted(handled(tmp_path)) == [0, 1]


# ------------------------------------------- 4. data lost while connections stay open


@pytest.mark.timeout(90)
def test_a_flushdb_mid_run_fails_the_run_with_exit_3(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Given a run of 40 slow tasks on its own server, some handled
    env = pcq_env(redis_server.url, tmp_path, JOBS_N="40", JOBS_SLEEP="0.05")
    run = start_pcq(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--backend", "redis",
                     "--workers", "2", "--json", "--no-progress"], env)
    wait_for(lambda: len(handled(tmp_path)) >= 4, timeout=30, message="4 tasks handled")

    # When the server's data is flushed, every connection staying open
    redis_server.client().flushdb()

    # Then the run fails with the data-loss error and never reports success
    out, err = run.communicate(timeout=40)
    assert run.returncode == 3, (out, err)
    assert f"the Redis server lost queue {env['PCQ_QUEUE']}'s data" in err
    assert '"exit_code": 0' not in out and "Traceback" not in err


# ------------------------------------------- 5. purge keeps a closed run closed


@pytest.mark.timeout(90)
def test_a_live_consumer_exits_after_close_then_purge(redis_url: str, tmp_path: Path) -> None:
    # Given a consumer holding task 0 of five, the queue closed behind them
    env = pcq_env(redis_url, tmp_path)
    hold(tmp_path, 0)
    host = consume(env)
    put(env, 0, 5)
    wait_for(lambda: started(tmp_path) == [0], timeout=30, message="task 0 started")
    assert pcq(env, "close").returncode == 0

    # When the queue is purged and the held task finishes
    purged = pcq(env, "purge")
    assert purged.returncode == 0, purged.stderr
    let_go(tmp_path, 0)

    # Then the consumer exits: the run is still closed, and nothing is left
    assert host.wait(timeout=30) == 0
    status = pcq(env, "status", "--json")
    assert json.loads(status.stdout)["state"] == "idle", status.stdout


# ------------------------------------------- 9. a queue name maps to its own keys


@pytest.mark.timeout(90)
def test_a_name_that_would_share_another_queues_keys_is_refused(
    redis_url: str, tmp_path: Path
) -> None:
    # Given queue "a" with one task
    env = pcq_env(redis_url, tmp_path)
    plain = env["PCQ_QUEUE"]
    put(env, 0)

    # When a command names the queue "{a}" (or "{a}:x", inside a's keys)
    for name in (f"{{{plain}}}", f"{{{plain}}}:ready"):
        done = pcq({**env, "PCQ_QUEUE": name}, "produce", f"{JOBS}:produce", "--no-wait")

        # Then it is refused with one line, exit 2, and queue "a" is untouched
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"pcq: error: bad queue name {name!r}: on Redis it would share keys with queue "
            f"{plain!r}; name it {plain!r}, or add to the tag (e.g. '{{{plain}}}.main')"
        ]
    status = json.loads(pcq(env, "status", "--json").stdout)
    assert (status["produced"], status["ready"]) == (1, 1)

    # and a pipeline's stage queues still share the first queue's hash slot
    first, second = RedisQueue(plain, url=redis_url), RedisQueue(stage_queue(plain, 1),
                                                                 url=redis_url)
    assert key_slot(first.keys.ready.encode()) == key_slot(second.keys.ready.encode())
    assert first.keys.ready != second.keys.ready
    for q in (first, second):
        q.dispose()


# ------------------------------------------- 1. a killed producer is detached by its id


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stages", [1, 2], ids=["one-stage", "pipeline"])
def test_a_killed_producer_ends_the_job_at_once_with_a_producer_error(
    redis_url: str, tmp_path: Path, stages: int
) -> None:
    # Given a job of two producers, one of which SIGKILLs itself after one task
    env = pcq_env(redis_url, tmp_path, JOBS_N="10")
    handlers = [f"{APP}:double"] * (stages - 1) + [f"{JOBS}:handle"]
    run = start_pcq(["run", f"{APP}:produce_one_dies", *handlers, "--backend", "redis",
                     "--producers", "2", "--workers", "1", "--heartbeat-ttl", "120",
                     "--json", "--no-progress"], env)

    # When it runs (the dead producer's heartbeat would keep it open for 120 s)
    out, err = run.communicate(timeout=60)  # the dead producer's TTL is 120 s

    # Then it ends at once, counting the dead producer as a producer error, and
    # leaves the queue closed
    assert run.returncode == 1, (out, err)
    summary = json.loads(out)
    assert summary["producer_errors"] == 1 and summary["exit_code"] == 1, out
    status = json.loads(pcq(env, "status", "--json").stdout)
    assert status["closed"] and status["producers"] == 0, status


# ------------------------------------------- 6. lost replies, kills, huge retries


class ReplyCutter:
    """A TCP proxy in front of a real redis-server that, once armed, drops the
    connection on the server's next reply instead of passing it on: the
    command ran, its reply is lost (as in a network cut)."""

    def __init__(self, port: int) -> None:
        self.armed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self._port = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self._port))
                threading.Thread(target=self._pipe, args=(client, server, False),
                                 daemon=True).start()
                threading.Thread(target=self._pipe, args=(server, client, True),
                                 daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if replies and self.armed.is_set():
                    self.armed.clear()
                    break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def cutter(shared_redis: RedisServer) -> Iterator[ReplyCutter]:
    proxy = ReplyCutter(shared_redis.port)
    yield proxy
    proxy.close()


@pytest.mark.timeout(30)
def test_a_resent_ack_after_a_lost_reply_counts_once_and_leaks_no_death(
    cutter: ReplyCutter, redis_url: str
) -> None:
    # Given a suspect (its consumer died with it in flight) taken by consumer B,
    # which talks to the server through a connection that will be cut
    name = f"t-{uuid.uuid4().hex[:10]}"
    dead = RedisQueue(name, url=redis_url, heartbeat_ttl=0.3)
    b = RedisQueue(name, url=cutter.url, heartbeat_ttl=30)
    server = redis.Redis.from_url(redis_url)
    try:
        dead.attach_consumer()
        dead.put(7)
        assert dead.take(1, timeout=5) is not None
        dead.dispose()  # its heartbeat stops
        b.attach_consumer()
        wait_for(lambda: b.reap() == 1, timeout=5, message="the reap of the dead consumer")
        suspect = b.take(1, timeout=5)
        assert suspect is not None and suspect.deaths == 1

        # When B's ack runs (the script is loaded: no NOSCRIPT reply comes
        # first) but its reply is lost, and B sends it again
        server.script_load(load_script("ack"))
        cutter.armed.set()
        applied = b.ack(suspect)

        # Then the ack counts once, as applied, and no death count is left
        assert applied and b.stale_leases == 0
        c = b.counters()
        assert (c.done, c.pending, c.in_flight) == (1, 0, 0)
        assert server.hlen(b.keys.deaths) == 0
    finally:
        b.forget()
        b.dispose()
        server.close()


@pytest.mark.timeout(30)
def test_an_ack_sent_after_the_kill_decision_commits_nothing(redis_url: str) -> None:
    # Given a consumer (this process) running a task past its timeout
    name = f"t-{uuid.uuid4().hex[:10]}"
    consumer, supervisor = RedisQueue(name, url=redis_url), RedisQueue(name, url=redis_url)
    try:
        consumer.attach_consumer()
        supervisor.put(5)
        lease = consumer.take(1, timeout=5)
        assert lease is not None
        (env,) = lease.envelopes()

        # When its supervisor decides to kill it, and the task's ack comes in
        # before the SIGKILL lands
        supervisor.killing(os.getpid(), env.id)
        assert not consumer.ack(lease)

        # Then that ack committed nothing: the supervisor fails the task
        assert consumer.counters().done == 0
        failed = supervisor.fail_running(os.getpid(), env.id,
                                         lambda e: Failure(e, "TaskTimeout: ran too long"))
        assert failed
        supervisor.release(os.getpid())
        c = supervisor.counters()
        assert (c.done, c.failed, c.dead, c.pending) == (0, 1, 1, 0)
    finally:
        supervisor.forget()
        for q in (consumer, supervisor):
            q.dispose()


@pytest.mark.timeout(60)
def test_a_task_far_into_its_retries_is_retried_without_overflow(
    redis_url: str, tmp_path: Path
) -> None:
    # Given a task that failed 2000 times already, on a queue whose consumer
    # allows a huge number of retries
    env = pcq_env(redis_url, tmp_path)
    q = RedisQueue(env["PCQ_QUEUE"], url=redis_url)
    q.attach_producer()
    q._put([encode_envelope(Envelope(new_tag(), 0, 5, 2000, 0.0))], 1)
    q.detach_producer(close_if_last=False)
    host = start_pcq(["consume", f"{JOBS}:handle_failing", "--workers", "1",
                      "--retries", "100000"], env)

    # When it fails once more
    # Then its retry is scheduled (a capped backoff), and the consumer lives on
    wait_for(lambda: q.counters().delayed == 1, timeout=30, message="the retry scheduled")
    c = q.counters()
    assert (c.dead, c.retried) == (0, 1)
    assert host.poll() is None
    host.send_signal(signal.SIGTERM)
    _, err = host.communicate(timeout=30)
    assert "Traceback" not in err and "OverflowError" not in err, err
    q.forget()
    q.dispose()


# ------------------------------------------- #19 item 4: reading never writes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["dead", "list"]],
                         ids=["status", "status-json", "dead-list"])
def test_reading_a_queue_that_does_not_exist_writes_nothing(
    redis_url: str, tmp_path: Path, command: list[str]
) -> None:
    # Given a server without queue "typo…"
    env = pcq_env(redis_url, tmp_path)
    name = env["PCQ_QUEUE"]
    server = redis.Redis.from_url(redis_url)

    # When a read-only command names it
    done = pcq(env, *command)

    # Then it says the queue does not exist, exit 2, and leaves no key behind
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == (
        f"pcq: error: queue {name!r} does not exist on this server (nothing was ever put "
        "in it, and no consumer or producer is attached)")
    assert server.keys(f"pcq:*{name}*") == []
    server.close()
