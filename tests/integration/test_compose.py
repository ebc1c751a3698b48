"""The compose file's producer and consumer commands, run for real against the
test's redis-server, so that compose/docker-compose.yml cannot rot."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import redis
from helpers import wait_for
from helpers_cli import ROOT, pcq_env, start_pcq

COMPOSE = ROOT / "compose" / "docker-compose.yml"


def service(name: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a service, read from the compose file's text."""
    text = COMPOSE.read_text()
    block = re.search(rf"^  {name}:\n((?:    .*\n|\n)+)", text, re.M)
    assert block, f"no service {name!r} in {COMPOSE}"
    body = block.group(1)
    command = json.loads(re.search(r"^    command: (\[.*\])$", body, re.M).group(1))
    env = dict(re.findall(r"^      (PCQ_\w+): (\S+)$", body, re.M))
    return command, env


@pytest.mark.timeout(120)
def test_compose_producer_and_scaled_consumers_finish_the_job(redis_url, tmp_path):
    produce_cmd, produce_env = service("producer")
    consume_cmd, consume_env = service("consumer")
    assert produce_cmd[:2] == ["pcq", "produce"] and consume_cmd[:2] == ["pcq", "consume"]
    assert produce_env["PCQ_QUEUE"] == consume_env["PCQ_QUEUE"]
    env = pcq_env(redis_url, tmp_path, PRIMES_RANGES="30", PRIMES_WIDTH="2000")
    env["PCQ_QUEUE"] = produce_env["PCQ_QUEUE"]  # the file's queue, the test's server

    def start(command: list[str]) -> subprocess.Popen[str]:
        return start_pcq(command[1:], env)  # `pcq` is this interpreter's pcq.cli

    consumers = [start(consume_cmd) for _ in range(3)]  # --scale consumer=3
    # A consumer that attaches after the run has finished waits for the next run
    # (idle is new): let all of them attach first, as containers started together do
    # unless the job is very short.
    key = f"pcq:{{{env['PCQ_QUEUE']}}}:consumers"
    wait_for(lambda: redis.Redis.from_url(redis_url).hlen(key) == 6, timeout=60)
    producer = start(produce_cmd)
    out, err = producer.communicate(timeout=90)
    assert producer.returncode == 0, err
    summary = json.loads(out)
    assert summary["produced"] == 30 and summary["done"] == 30
    for consumer in consumers:
        consumer.communicate(timeout=60)
        assert consumer.returncode == 0
