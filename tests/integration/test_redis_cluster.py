"""A real 3-master Redis Cluster (issue #17): every command works through a node
that does not own the queue's slot, and a pipeline's queues share a slot.

One cluster serves the module (forming one takes a few seconds); each test
uses fresh queue names.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from apps.jobs import handled
from apps.pipes import recorded
from helpers_cli import pcq_env, start_pcq
from redis_cluster import RedisClusterNodes

import pcq
from pcq.backends.redis import RedisQueue, key
from pcq.errors import ConfigError

JOBS = "tests/apps/jobs.py"
PIPES = "tests/apps/pipes.py"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(masters=3).start()
    try:
        yield nodes
    finally:
        nodes.cleanup()


def queue_owned_by(cluster: RedisClusterNodes, index: int) -> str:
    """A fresh queue name whose slot lives on master ``index``."""
    while True:
        name = f"t-{uuid.uuid4().hex[:10]}"
        if cluster.owner(key(name, "run")) is cluster.nodes[index]:
            return name


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.timeout(90)
def test_jobs_on_every_master_reached_through_a_node_that_does_not_own_them(cluster, tmp_path):
    for index in range(3):
        # Given a queue owned by master `index`, and the URL of another master
        queue = queue_owned_by(cluster, index)
        url = cluster.url((index + 1) % 3)
        out = tmp_path / str(index)
        out.mkdir()
        env = pcq_env(url, out, JOBS_N="200", PCQ_QUEUE=queue)
        # When a job runs there
        code, stdout, err = finish(start_pcq(
            ["run", f"{JOBS}:produce", f"{JOBS}:handle", "--backend", "redis", "--workers", "2",
             "--json", "--no-progress"], env))
        # Then it ends, exit 0, every task handled, and its keys are on the owner
        assert code == 0, err
        summary = json.loads(stdout)
        assert (summary["produced"], summary["done"]) == (200, 200)
        assert Counter(handled(out)) == Counter(range(200))
        assert cluster.nodes[index].client().exists(key(queue, "counters")) == 1


@pytest.mark.timeout(90)
def test_produce_consume_status_dead_close_purge_through_any_node(cluster, tmp_path):
    queue = queue_owned_by(cluster, 0)
    env = {**pcq_env(cluster.url(1), tmp_path, JOBS_N="50", PCQ_QUEUE=queue)}
    # Given a producer through node 1 that puts and closes, with failing tasks
    code, stdout, err = finish(start_pcq(["produce", f"{JOBS}:produce", "--no-wait", "--json"],
                                         env))
    assert code == 0, err
    assert json.loads(stdout)["produced"] == 50
    # When consumers through node 2 handle them (every fifth fails for good)
    code, _, err = finish(start_pcq(["consume", f"{JOBS}:handle_failing", "--workers", "2",
                                     "--retries", "0", "--url", cluster.url(2)], env))
    assert code == 1, err
    # Then status and dead through any node see the same queue
    for node in range(3):
        code, stdout, err = finish(start_pcq(["status", "--json", "--url", cluster.url(node)], env))
        assert code == 0, err
        status = json.loads(stdout)
        assert (status["produced"], status["done"], status["dead"]) == (50, 40, 10), status
    code, stdout, err = finish(start_pcq(["dead", "list", "--url", cluster.url(2)], env))
    assert code == 0 and len(stdout.splitlines()) == 10, err
    # ... and close and purge work through a non-owner too
    for command in (["close"], ["purge"]):
        code, _, err = finish(start_pcq([*command, "--url", cluster.url(1)], env))
        assert code == 0, err
    assert cluster.nodes[0].client().llen(key(queue, "ready")) == 0


@pytest.mark.timeout(90)
def test_a_two_stage_pipeline_and_map_through_one_node(cluster, tmp_path):
    # Given a queue owned by master 0 and the URL of master 2
    queue = queue_owned_by(cluster, 0)
    env = pcq_env(cluster.url(2), tmp_path, PIPES_OUT=str(tmp_path), PIPES_N="300",
                  PCQ_QUEUE=queue)
    # When a two-stage pipeline runs there
    code, stdout, err = finish(start_pcq(
        ["run", f"{PIPES}:produce", f"{PIPES}:spread", f"{PIPES}:record", "--backend", "redis",
         "--workers", "2,1", "--json", "--no-progress"], env))
    # Then every output arrives once: both stage queues share the first one's slot
    assert code == 0, err
    want = Counter((x, k) for x in range(300) if x % 6 for k in (0, 1))
    assert recorded(tmp_path) == want
    summary = json.loads(stdout)
    assert [(s["produced"], s["done"]) for s in summary["stages"]] == [(300, 300), (500, 500)]
    # ... and pcq.map through a non-owning node returns every result in order
    results = list(pcq.map(abs, range(-100, 0), workers=2, ordered=True, backend="redis",
                           url=cluster.url(1), queue=queue_owned_by(cluster, 2)))
    assert results == list(range(100, 0, -1))


@pytest.mark.timeout(60)
def test_a_stage_feeding_a_queue_in_another_slot_is_a_clear_error(cluster):
    # Given two queues on different masters (no shared hash tag)
    first = RedisQueue(queue_owned_by(cluster, 0), url=cluster.url(0))
    other = RedisQueue(queue_owned_by(cluster, 1), url=cluster.url(0))
    same = RedisQueue(f"{{{first.name}}}.2", url=cluster.url(1))
    try:
        # Then one cannot feed the other (one script writes both), and says why
        with pytest.raises(ConfigError, match="hash tag"):
            first._target(other)
        # ... while a queue that shares the first one's tag can
        assert first._target(same) == same.keys
    finally:
        for q in (first, other, same):
            q.dispose()
