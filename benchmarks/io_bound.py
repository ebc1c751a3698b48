"""``--concurrency`` benchmarks: waiting work, and the cost of the option at C = 1.

    python -m benchmarks.io_bound                         # io: C = 1, 10, 100, 3 repetitions
    python -m benchmarks.io_bound --baseline-tree /tmp/pcq-main   # + noop/cpu vs that tree
    python -m benchmarks.io_bound --repeat 1 --slots 10 --only io

**io** — N = 40 x C tasks that each wait 50 ms (``time.sleep`` in a plain
handler, ``asyncio.sleep`` in an ``async def`` one), on one consumer process
with ``concurrency=C``, against the ceiling for the same C slots in one
process: a plain ``ThreadPoolExecutor(C).map`` and a plain ``asyncio.gather``
under a ``Semaphore(C)``.  The ideal is 2.0 s whatever C.  Wall time includes
starting the pool (or pcq's processes) and the result is N / wall; the ratio
pcq / ceiling is taken per repetition (both ran seconds apart), its median
reported.

**c1** (with ``--baseline-tree``) — the existing noop and cpu trials of
``benchmarks.trial`` (``pcq-local-1000``, ``pcq-redis``; default concurrency 1)
run alternately from this tree and from the baseline tree (e.g. main:
``git archive main | tar -x -C /tmp/pcq-main``); ratio this / baseline.

Every trial runs in a fresh interpreter.  Needs redis-server on PATH for the
redis rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/io_bound.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import tasks, workloads
from benchmarks.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "
WAIT_S = 0.050
TASKS_PER_SLOT = 40
#: pcq systems and the ceiling each is compared with.
CEILING = {"pcq-local-threads": "threadpool", "pcq-local-async": "gather",
           "pcq-redis-threads": "threadpool", "pcq-redis-async": "gather"}
SYSTEMS = [*CEILING, "threadpool", "gather"]


def wait(item: int) -> None:
    time.sleep(WAIT_S)


async def await_wait(item: int) -> None:
    await asyncio.sleep(WAIT_S)


def io_trial(system: str, slots: int, url: str | None) -> dict[str, Any]:
    """One io trial in this interpreter; N / wall."""
    n = TASKS_PER_SLOT * slots
    started = time.monotonic()
    if system == "threadpool":
        with ThreadPoolExecutor(slots) as pool:
            done = sum(1 for _ in pool.map(wait, range(n)))
    elif system == "gather":
        done = asyncio.run(_gather(n, slots))
    else:
        from pcq.run import run

        handle = await_wait if system.endswith("async") else wait
        backend = "redis" if "redis" in system else "local"
        queue = f"io-{os.getpid()}-{time.time_ns()}"
        summary = run(lambda: range(n), handle, workers=1, concurrency=slots, maxsize=1000,
                      backend=backend, url=url if backend == "redis" else None, queue=queue)
        done = summary.done
    wall = time.monotonic() - started
    return {"ok": done == n, "n": n, "wall_s": wall, "rate": n / wall}


async def _gather(n: int, slots: int) -> int:
    gate = asyncio.Semaphore(slots)

    async def one(item: int) -> None:
        async with gate:
            await await_wait(item)

    await asyncio.gather(*(one(i) for i in range(n)))
    return n


def in_fresh_interpreter(args: list[str], tree: Path, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-m", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            result: dict[str, Any] = json.loads(line[len(RESULT):])
            return result
    return {"ok": False, "error": proc.stderr[-500:]}


def _median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs if b)


def io_suite(repeat: int, slot_counts: list[int], url: str | None) -> list[str]:
    rates: dict[tuple[str, int], list[float]] = {}
    systems = [s for s in SYSTEMS if url or "redis" not in s]
    for rep in range(repeat):
        for slots in slot_counts:
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for system in order:
                spec = json.dumps({"system": system, "slots": slots, "url": url})
                r = in_fresh_interpreter(["benchmarks.io_bound", "--trial", spec], ROOT, 600)
                if not r.get("ok"):
                    raise SystemExit(f"{system} C={slots} failed: {r}")
                rates.setdefault((system, slots), []).append(r["rate"])
                print(f"  [{rep + 1}/{repeat}] io C={slots:<3} {system:18} "
                      f"{r['rate']:8.1f} tasks/s ({r['wall_s']:.2f} s)", file=sys.stderr)
    lines = ["| C | system | tasks/s (median) | ideal | ceiling | pcq / ceiling (median) |",
             "|---|---|---|---|---|---|"]
    for slots in slot_counts:
        ideal = slots / WAIT_S
        for system in systems:
            mine = rates[(system, slots)]
            ceiling = CEILING.get(system)
            ratio = "" if ceiling is None else \
                f"{_median_ratio(list(zip(mine, rates[(ceiling, slots)], strict=True))):.2f}"
            lines.append(f"| {slots} | {system} | {statistics.median(mine):,.1f} | "
                         f"{ideal:,.0f} | {ceiling or ''} | {ratio} |")
    return lines


def c1_suite(repeat: int, baseline: Path, url: str | None) -> list[str]:
    spin_k = tasks.calibrate_spin(workloads.CPU_TASK_SECONDS)
    cases = [("noop", "pcq-local-1000", "rate"), ("cpu", "pcq-local-1000", "efficiency")]
    if url:
        cases += [("noop", "pcq-redis", "rate"), ("cpu", "pcq-redis", "efficiency")]
    values: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(repeat):
        for workload, system, key in cases:
            n = workloads.sizes(workload, system, False)[0]
            trees = [("this", ROOT), ("baseline", baseline)]
            for label, tree in trees if rep % 2 == 0 else trees[::-1]:
                spec = {"rep": rep, "workload": workload, "system": system, "n": n,
                        "workers": workloads.WORKERS, "spin_k": spin_k,
                        "url": url if "redis" in system else None}
                r = in_fresh_interpreter(["benchmarks.trial", json.dumps(spec)], tree, 300)
                if not r.get("ok", True) or key not in r:
                    raise SystemExit(f"{workload} {system} ({label}) failed: {r}")
                values.setdefault((workload, system, label), []).append(r[key])
                print(f"  [{rep + 1}/{repeat}] {workload:5} {system:15} {label:8} "
                      f"{key} {r[key]:,.3f}", file=sys.stderr)
    lines = ["| workload | system | this tree (median) | baseline (median) | this / baseline "
             "(median of per-repetition ratios) |", "|---|---|---|---|---|"]
    for workload, system, key in cases:
        mine, base = values[(workload, system, "this")], values[(workload, system, "baseline")]
        lines.append(f"| {workload} ({key}) | {system} | {statistics.median(mine):,.3f} | "
                     f"{statistics.median(base):,.3f} | "
                     f"{_median_ratio(list(zip(mine, base, strict=True))):.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.io_bound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--slots", default="1,10,100", help="concurrency values (default 1,10,100)")
    p.add_argument("--only", default="io,c1", help="io, c1 or both (c1 needs --baseline-tree)")
    p.add_argument("--baseline-tree", type=Path, help="a checkout to compare noop/cpu with")
    p.add_argument("--no-redis", action="store_true", help="leave out the redis rows")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trial:
        spec = json.loads(args.trial)
        print(RESULT + json.dumps(io_trial(spec["system"], spec["slots"], spec["url"])))
        return 0
    only = set(args.only.split(","))
    with RedisServer() if not args.no_redis else _Nothing() as server:
        url = server.url if server is not None else None
        out = []
        if "io" in only:
            slot_counts = [int(s) for s in args.slots.split(",")]
            out += ["### I/O-bound: N = 40 x C tasks of 50 ms, one process", "",
                    *io_suite(args.repeat, slot_counts, url), ""]
        if "c1" in only and args.baseline_tree:
            out += [f"### Concurrency 1: noop and cpu, this tree vs {args.baseline_tree}", "",
                    *c1_suite(args.repeat, args.baseline_tree, url), ""]
    print("\n".join(out))
    return 0


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    sys.exit(main())
