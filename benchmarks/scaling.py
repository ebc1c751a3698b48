"""Scaling: noop and cpu throughput at W = 1, 2, 4, 8, 16 consumer processes.

    python -m benchmarks.scaling                      # local + pool + jq, then two redis "hosts"
    python -m benchmarks.scaling --repeat 3 --widths 1,2,4 --no-hosts

On a 2-core machine a curve should rise to W = 2 and then stay flat: more
processes than cores can add nothing, but they must not take throughput away
(a queue whose consumers contend for a lock, or spin, falls past the cores).
Each row is a median over ``--repeat`` repetitions; within a repetition every
system runs at one W back to back, so load drifts hit all of them alike.

The "hosts" rows run the way a team runs pcq on a rack: one ``pcq produce`` and
two ``pcq consume --workers W/2`` processes (two "hosts" on this machine) on one
redis-server; the rate is N over the time from the producer's start to the last
consumer's exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import tasks, workloads
from benchmarks.redis_server import RedisServer
from benchmarks.run import describe, run_trial

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "scaling.json"
WIDTHS = [1, 2, 4, 8, 16]
#: noop N per system at every W (about 1-2 s each on 2 cores).
NOOP_N = {"pcq-local-1000": 1_000_000, "pool-500": 2_000_000, "jq-unbounded": 100_000,
          "pcq-redis": 2_000_000}  # with batches ~1 M/s: N dwarfs W processes' start and exit
CPU_SYSTEMS = ["pcq-local-1000", "jq-unbounded"]
HOSTS_N = 1_000_000  # the window includes three CLI start-ups (~1 s): N must dwarf them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                   help="consumer process counts, comma-separated")
    p.add_argument("--no-hosts", action="store_true", help="skip the two-hosts redis rows")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",")]
    return args


def hosts_trial(url: str, n: int, workers: int) -> dict[str, Any]:
    """One ``pcq produce`` and two ``pcq consume`` processes on one queue."""
    queue = f"scale-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PCQ_URL=url, PCQ_QUEUE=queue, PCQ_LOG_LEVEL="error",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get(
                   "PYTHONPATH")])]))
    per_host = max(1, workers // 2)
    cmd = [sys.executable, "-m", "pcq.cli"]
    started = time.monotonic()
    # Output to files, not pipes: nobody reads them until the end (a full pipe
    # would stall a consumer), and no terminal means no progress display.
    consumers = [subprocess.Popen([*cmd, "consume", "benchmarks.tasks:noop", "--workers",
                                   str(per_host)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
                 for _ in range(2)]
    try:
        producer = subprocess.run([*cmd, "produce", "benchmarks.tasks:ints_from_env", "--json"],
                                  cwd=ROOT, env={**env, "PCQ_BENCH_N": str(n)},
                                  capture_output=True, text=True, timeout=300)
        codes = [c.wait(timeout=120) for c in consumers]
    finally:
        for c in consumers:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGKILL)
                c.wait()
    window = time.monotonic() - started
    ok = producer.returncode == 0 and codes == [0, 0]
    out: dict[str, Any] = {"ok": ok, "workload": "noop", "window_s": window,
                           "rate": n / window}
    if not ok:
        out["error"] = (f"produce exit {producer.returncode}, consume exits {codes}: "
                        f"{producer.stderr[-300:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spin_k = tasks.calibrate_spin(workloads.CPU_TASK_SECONDS)
    rows: dict[str, dict[int, list[float]]] = {}

    def note(row: str, w: int, t: dict[str, Any], key: str) -> None:
        shown = describe(t) if "system" in t else f"{t.get('rate', 0):,.0f} tasks/s"
        print(f"  W={w:<3} {row:26} {shown}",
              file=sys.stderr, flush=True)
        if t.get("ok") and t.get(key) is not None:
            rows.setdefault(row, {}).setdefault(w, []).append(t[key])

    with RedisServer() as server:
        for rep in range(args.repeat):
            print(f"repetition {rep + 1}/{args.repeat}", file=sys.stderr, flush=True)
            for w in args.widths:
                for system, n in NOOP_N.items():
                    spec = {"workload": "noop", "system": system, "n": n, "workers": w,
                            "url": server.url if system == "pcq-redis" else None}
                    note(f"noop {system}", w, {**spec, **run_trial(spec, 300)}, "rate")
                    if system == "pcq-redis":
                        server.command("FLUSHALL")
                for system in CPU_SYSTEMS:
                    spec = {"workload": "cpu", "system": system, "n": 100 * w,
                            "workers": w, "spin_k": spin_k}
                    t = {**spec, **run_trial(spec, 300)}
                    if t.get("ok"):  # cores' worth of useful work: rises to nproc, then flat
                        t["cores_used"] = t["efficiency"] * w
                    note(f"cpu {system}", w, t, "cores_used")
                if not args.no_hosts and w >= 2:
                    note("noop 2 hosts on redis", w, hosts_trial(server.url, HOSTS_N, w), "rate")
                    server.command("FLUSHALL")

    text = _table(rows, args.widths)
    print("\nnoop: tasks/s; cpu: cores' worth of useful work (n x t1 / window); medians\n")
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"widths": args.widths, "repeat": args.repeat,
                                     "rows": rows, "markdown": text}, indent=1) + "\n")
    return 0


def _table(rows: dict[str, dict[int, list[float]]], widths: list[int]) -> str:
    """The markdown table: one line per row, the median of each width's values."""
    table = ["| row | " + " | ".join(f"W={w}" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for row, by_w in rows.items():
        cells = []
        for w in widths:
            vals = by_w.get(w)
            if not vals:
                cells.append("—")
            elif row.startswith("cpu"):
                cells.append(f"{statistics.median(vals):.2f} cores")
            else:
                cells.append(f"{statistics.median(vals) / 1000:,.0f} k/s")
        table.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(table)


if __name__ == "__main__":
    sys.exit(main())
