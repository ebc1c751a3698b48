"""A failover loses nothing (issue #17): the master that holds a running job's
queue is SIGKILLed mid-run, on a Redis Cluster (3 masters + 3 replicas) and
behind Sentinel (a master, a replica, three sentinels).  The job goes on by
itself on the promoted replica; ``produce --json`` says produced = done = N,
every process exits 0, every item was handled at least once.

And a *lagging* replica: replication to it is held in a TCP proxy the test
controls, so the replica promoted after the kill really is behind.  Without
WAIT (``?wait=0``) a put that returned is lost; with WAIT (the default when the
master has a replica) it is re-sent to the new master and nothing is lost.

Each test prints how long the job stood still (kill -> the first task done on
the new master); run with ``-s`` to see it.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from apps.jobs import handled
from helpers import wait_for
from helpers_cli import pcq_env, start_pcq
from redis_cluster import LaggingCluster, Proxy, RedisClusterNodes, SentinelGroup
from redis_server import RedisServer

from pcq.backends.redis import RedisQueue, key

JOBS = "tests/apps/jobs.py"
N = 400


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(masters=3, replicas=1).start()
    try:
        yield nodes
    finally:
        nodes.cleanup()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def done_on(master: Callable[[], RedisServer | None], queue: str) -> int | None:
    """The queue's done counter on the current master, None while there is none."""
    server = master()
    if server is None:
        return None
    try:
        return int(server.client().hget(key(queue, "counters"), "done") or 0)
    except redis.exceptions.RedisError:
        return None


def job_through_a_failover(
    env: dict[str, str], out: str, kill: Callable[[], None],
    master: Callable[[], RedisServer | None], secret: str = "",
) -> float:
    """Run a job on two consumer hosts; kill the master a quarter of the way in;
    check the job ends whole.  Returns seconds from the kill to the first task
    done on the new master."""
    hosts = [start_pcq(["consume", f"{JOBS}:handle", "--workers", "2"], env) for _ in range(2)]
    producer = start_pcq(["produce", f"{JOBS}:produce", "--json"], env)
    wait_for(lambda: len(handled(out)) >= N // 4, timeout=30)
    queue = env["PCQ_QUEUE"]
    start = time.monotonic()
    kill()
    first: list[int] = []

    def going_on() -> bool:
        seen = done_on(master, queue)
        if seen is not None and not first:
            first.append(seen)
        return bool(first) and seen is not None and seen > first[0]

    wait_for(going_on, timeout=30)
    stood_still = time.monotonic() - start
    code, stdout, err = finish(producer)
    assert code == 0, err
    assert not secret or secret not in stdout + err
    summary = json.loads(stdout)
    assert (summary["produced"], summary["done"], summary["failed"]) == (N, N, 0), summary
    for host in hosts:
        code, stdout, err = finish(host)
        assert code == 0, err
        assert not secret or secret not in stdout + err
    assert set(handled(out)) == set(range(N))  # at least once; a redelivery may repeat one
    return stood_still


@pytest.mark.timeout(90)
def test_the_master_of_a_running_jobs_queue_is_killed_in_a_cluster(cluster, tmp_path):
    # Given a queue whose master has a replica, reached through another master
    queue = f"t-{uuid.uuid4().hex[:10]}"
    owner = cluster.owner(key(queue, "run"))
    other = next(n for n in cluster.nodes if n is not owner and n in cluster.live())
    env = pcq_env(other.url, tmp_path, JOBS_N=str(N), JOBS_SLEEP="0.02", PCQ_QUEUE=queue)

    def master() -> RedisServer | None:
        now = cluster.owner(key(queue, "run"))
        return None if now is owner else now

    # When that master is SIGKILLed mid-run, the job goes on and ends whole
    stood = job_through_a_failover(env, str(tmp_path), owner.kill, master)
    print(f"\ncluster failover: kill -> job going on in {stood:.1f} s", file=sys.stderr)


@pytest.mark.timeout(60)
def test_a_process_started_after_the_urls_node_died_still_finds_the_cluster(cluster):
    # Given a queue opened through a replica node, as a parent does before its children
    entry = next(n for n in cluster.live()
                 if n.client().info("replication")["role"] == "slave")
    q = RedisQueue(f"t-{uuid.uuid4().hex[:10]}", url=entry.url)
    q.put_many(range(5))
    travelled = pickle.dumps(q)  # what a child process receives
    q.dispose()
    # When the node named in the URL dies, and then a child starts
    entry.kill()
    child = pickle.loads(travelled)
    try:
        # Then the child reaches the queue through the nodes its parent found
        assert child.counters().produced == 5
    finally:
        child.dispose()


@pytest.mark.timeout(90)
def test_the_master_of_a_running_job_is_killed_behind_sentinel(tmp_path):
    secret = "failover-data-secret"
    group = SentinelGroup(replicas=1, sentinels=3, password=secret).start()
    try:
        env = pcq_env(group.url(), tmp_path, JOBS_N=str(N), JOBS_SLEEP="0.02")
        old = group.master

        def master() -> RedisServer | None:
            port = group.master_port()
            return next((r for r in group.replicas if r.port == port), None)

        stood = job_through_a_failover(env, str(tmp_path), old.kill, master, secret)
        print(f"\nsentinel failover: kill -> job going on in {stood:.1f} s", file=sys.stderr)
    finally:
        group.cleanup()


def puts_through_a_lagging_failover(
    q: RedisQueue, wait: str, proxy: Proxy, replica: RedisServer, fail_over: Callable[[], None],
) -> int:
    """Put 50 tasks (they reach the replica), hold replication, put 50 more,
    kill the master and wait for the replica's promotion; returns ``produced``
    as the new master sees it."""
    q.put_many(range(50))  # the queue (and its marker) reached the replica
    counters = key(q.name, "counters")
    reader = redis.Redis(port=replica.port, single_connection_client=True)
    with contextlib.suppress(redis.exceptions.ResponseError):  # not a cluster node
        reader.execute_command("READONLY")  # a cluster replica answers reads
    wait_for(lambda: reader.hget(counters, "produced") == b"50", timeout=10)
    reader.close()
    # When replication stalls, 50 more are put, and then the master dies
    proxy.pause()
    putting = threading.Thread(target=q.put_many, args=(range(50, 100),), daemon=True)
    putting.start()
    if wait:  # without WAIT the put returns at once, as if it were safe
        putting.join(timeout=5)
        assert not putting.is_alive()
    else:  # with WAIT it is not done while no replica has it
        putting.join(timeout=1.5)
        assert putting.is_alive()
    fail_over()
    putting.join(timeout=30)
    assert not putting.is_alive()
    return q.counters().produced


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", ["", "?wait=0"])
def test_a_lagging_replica_behind_sentinel_loses_nothing_with_wait(wait, tmp_path):
    # Given a master whose one replica replicates through a proxy the test holds
    group = SentinelGroup(replicas=1, sentinels=3, proxied=True).start()
    assert group.proxy is not None
    q = RedisQueue(f"t-{uuid.uuid4().hex[:10]}", url=group.url() + wait, retry_for=30)

    def fail_over() -> None:
        group.master.kill()
        group.wait_for_new_master(group.monitored)

    try:
        produced = puts_through_a_lagging_failover(q, wait, group.proxy, group.replicas[0],
                                                   fail_over)
        # Then with WAIT the promoted replica has all 100; without, 50 are gone
        assert produced == (50 if wait else 100)
    finally:
        q.dispose()
        group.cleanup()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wait", ["", "?wait=0"])
def test_a_lagging_replica_in_a_cluster_loses_nothing_with_wait(wait, tmp_path):
    # Given a cluster whose master 0 has a replica that replicates through a proxy
    cluster = LaggingCluster().start()
    master, replica = cluster.nodes[0], cluster.nodes[3]
    while True:
        name = f"t-{uuid.uuid4().hex[:10]}"
        if cluster.owner(key(name, "run")) is master:
            break
    q = RedisQueue(name, url=cluster.url(1) + wait, retry_for=30)

    def fail_over() -> None:
        master.kill()
        cluster.wait_for_new_owner(key(name, "run"), master)

    try:
        produced = puts_through_a_lagging_failover(q, wait, cluster.proxy, replica, fail_over)
        assert produced == (50 if wait else 100)
    finally:
        q.dispose()
        cluster.cleanup()


@pytest.mark.timeout(30)
def test_a_master_refusing_writes_for_want_of_replicas_is_waited_out(tmp_path):
    # Given a queue on a server that then refuses writes while it has no replica
    server = RedisServer().start()
    q = RedisQueue(f"t-{uuid.uuid4().hex[:10]}", url=server.url + "?wait=0", retry_for=20)
    try:
        q.counters()
        server.client().config_set("min-replicas-to-write", 1)
        # When a producer puts, the put waits (it is not an error) ...
        putting = threading.Thread(target=q.put_many, args=(range(10),), daemon=True)
        putting.start()
        putting.join(timeout=1)
        assert putting.is_alive()
        # ... and goes through once the server takes writes again
        server.client().config_set("min-replicas-to-write", 0)
        putting.join(timeout=10)
        assert not putting.is_alive()
        assert q.counters().produced == 10
    finally:
        q.dispose()
        server.cleanup()
