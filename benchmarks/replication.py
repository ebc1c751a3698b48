"""What WAIT costs: noop throughput of pcq on a Redis master with one replica,
with ``?wait=0`` (no WAIT) and with the default (WAIT 1 once per batch), in
the same run, interleaved, as a ratio.

    python -m benchmarks.replication                  # N = 200,000, 3 repetitions
    python -m benchmarks.replication --n 50000 --repeat 1

A master (no persistence) and a replica (``--replicaof``) are started on free
loopback ports and stopped at the end.  Each trial is ``pcq.run.run(produce,
noop, workers=W, maxsize=1000, backend="redis")`` on a fresh queue; tasks/s =
N / the job's elapsed time (its summary's ``elapsed_s``: first put to the last
consumer's exit, as measured by the job).  The two variants alternate, the
first one rotating every repetition; the ratio is taken per repetition and the
median reported.  Target: WAIT costs at most 30 % (ratio >= 0.70).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/replication.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.redis_server import RedisServer
from benchmarks.tasks import noop
from pcq.run import run

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "replication.json"
VARIANTS = {"no WAIT": "?wait=0", "WAIT 1": ""}


def produce_n(n: int) -> Any:
    def produce() -> Any:
        return range(n)
    return produce


def trial(url: str, n: int, workers: int) -> float:
    summary = run(produce_n(n), noop, workers=workers, maxsize=1000, backend="redis", url=url,
                  queue=f"bench-{uuid.uuid4().hex[:8]}")
    if summary.done != n:
        raise RuntimeError(f"{summary.done} of {n} tasks done")
    return n / summary.elapsed_s


def wait_for_replica(master: RedisServer) -> None:
    deadline = time.monotonic() + 30
    while not _synced(master):
        if time.monotonic() > deadline:
            raise RuntimeError("the replica did not connect")
        time.sleep(0.1)


def _synced(master: RedisServer) -> bool:
    import redis  # only here: the module imports without redis-py
    info = redis.Redis(port=master.port).info("replication")
    return bool(info.get("slave0", {}).get("state") == "online")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replication", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="tasks per trial (%(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions (%(default)s)")
    p.add_argument("--workers", type=int, default=2, help="consumer processes (%(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = p.parse_args(argv)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with RedisServer(("--repl-diskless-sync-delay", "0")) as master, \
            RedisServer(("--replicaof", "127.0.0.1", str(master.port))):
        wait_for_replica(master)
        names = list(VARIANTS)
        for rep in range(args.repeat):
            for name in names[rep % 2:] + names[: rep % 2]:
                rate = trial(master.url + VARIANTS[name], args.n, args.workers)
                rates[name].append(rate)
                print(f"rep {rep + 1} {name}: {rate:,.0f} tasks/s", file=sys.stderr)
    ratios = [w / n for w, n in zip(rates["WAIT 1"], rates["no WAIT"], strict=True)]
    ratio = statistics.median(ratios)
    row = {name: statistics.median(values) for name, values in rates.items()}
    print("| N | W | no WAIT tasks/s | WAIT 1 tasks/s | ratio (median of reps) | WAIT costs |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.n:,} | {args.workers} | {row['no WAIT']:,.0f} | {row['WAIT 1']:,.0f} "
          f"| {ratio:.2f} | {1 - ratio:.0%} ({'pass' if ratio >= 0.7 else 'miss'}: <= 30 %) |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"n": args.n, "workers": args.workers, "rates": rates,
                                     "ratios": ratios, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
