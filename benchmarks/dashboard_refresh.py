"""What one dashboard refresh costs: Redis commands and time, with few tasks and
with 10 million ready ones.

    python -m benchmarks.dashboard_refresh            # 10,000,000 ready tasks
    python -m benchmarks.dashboard_refresh --ready 1000000 --refreshes 50

It starts its own redis-server, lays out a 3-stage pipeline (a producer and a
consumer attached to every stage, one task in flight on each, a dead letter on
the first), and times ``Collector.refresh()`` — what the dashboard's reader
thread does once a second — and one ``/metrics`` scrape.  Commands are counted
with ``INFO commandstats`` (commands that scripts run included) before and after.
Then it fills the first queue's ready list to ``--ready`` tasks with a Lua loop
(a million ``LPUSH`` per call, each a real encoded task) and measures again.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import redis

from benchmarks.redis_server import RedisServer
from pcq.backends.base import Failure
from pcq.backends.redis import RedisQueue
from pcq.dashboard.collect import Collector
from pcq.dashboard.metrics import Exposition
from pcq.dashboard.sources import RedisSource
from pcq.envelope import encode_each
from pcq.pipeline import stage_queue

FILL = """
for i = 1, tonumber(ARGV[2]) do redis.call('LPUSH', KEYS[1], ARGV[1]) end
redis.call('HINCRBY', KEYS[2], 'produced', ARGV[2])
return redis.call('HINCRBY', KEYS[2], 'pending', ARGV[2])
"""


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def pipeline(url: str, name: str) -> list[RedisQueue]:
    """Three stages, each with a producer, a consumer, a task in flight; a dead
    letter on the first."""
    queues = [RedisQueue(stage_queue(name, k), url=url, max_deliveries=0) for k in range(3)]
    for k, q in enumerate(queues):
        if k < 2:
            q.set_feeds(queues[k + 1].name)
        q.attach_producer()
        q.put_many(range(3))
        q.attach_consumer()
        lease = q.take(1, timeout=1)
        assert lease is not None
        if k == 0:
            failed = q.take(1, timeout=1)
            assert failed is not None
            env = next(failed.envelopes())
            q.ack(failed, [Failure(env, "ValueError: benchmark")])
    return queues


def measure(client: redis.Redis, collector: Collector, scrape: Exposition,
            refreshes: int) -> dict[str, Any]:
    collector.refresh()  # connect and load the scripts first: not counted
    scrape.render()
    times = []
    before = commands(client)
    for _ in range(refreshes):
        started = time.perf_counter()
        collector.refresh()
        times.append(time.perf_counter() - started)
    per_refresh = (commands(client) - before) / refreshes
    assert collector.state()["connected"], collector.state()
    before = commands(client)
    started = time.perf_counter()
    scrape.render()
    scrape_s = time.perf_counter() - started
    return {"commands": per_refresh, "median_ms": statistics.median(times) * 1000,
            "max_ms": max(times) * 1000, "scrape_commands": commands(client) - before,
            "scrape_ms": scrape_s * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready", type=int, default=10_000_000)
    parser.add_argument("--refreshes", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("pcq").setLevel(logging.ERROR)  # a server without persistence: known
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        queues = pipeline(server.url, "bench")
        collector = Collector(RedisSource(server.url))
        scrape = Exposition(collector.counters)
        rows = [(f"{queues[0].counters().ready:,} ready",
                 measure(client, collector, scrape, args.refreshes))]
        message = encode_each("benchmark0000", 0, [1])[0]
        fill = client.register_script(FILL)
        left = args.ready
        started = time.perf_counter()
        while left > 0:
            step = min(left, 1_000_000)
            fill(keys=[queues[0].keys.ready, queues[0].keys.counters], args=[message, step])
            left -= step
        filled_s = time.perf_counter() - started
        ready = queues[0].counters().ready
        rows.append((f"{ready:,} ready", measure(client, collector, scrape, args.refreshes)))
        collector.stop()
        for q in queues:
            q.dispose()
    print(f"filled {args.ready:,} tasks in {filled_s:.1f} s; {args.refreshes} refreshes each\n")
    print("| first queue | commands / refresh | refresh median | refresh max | "
          "/metrics commands | /metrics time |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, m in rows:
        print(f"| {label} | {m['commands']:.0f} | {m['median_ms']:.2f} ms | "
              f"{m['max_ms']:.2f} ms | {m['scrape_commands']} | {m['scrape_ms']:.2f} ms |")


if __name__ == "__main__":
    main()
