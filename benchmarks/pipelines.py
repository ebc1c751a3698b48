"""Pipelines and pcq.map against their baselines, side by side in one run.

    python -m benchmarks.pipelines                 # --repeat 3
    python -m benchmarks.pipelines --quick         # N / 10, one repetition

Rows (each trial in a fresh interpreter, systems interleaved within every
repetition, medians reported; W = 2 worker processes per stage):

* ``single-<backend>``: ``pcq.run(produce, noop)`` — the single-stage noop job;
* ``two-stage-<backend>``: ``pcq.run(produce, forward, noop)`` — every item
  goes through a first stage that returns it (one output each) into a second
  that does nothing; the same N items, so the rates compare directly;
* ``map-<backend>`` / ``map-ordered-<backend>``: ``pcq.map(identity, range(N),
  chunksize=500)`` consumed, unordered / ordered;
* ``pool-imap-unordered`` / ``pool-imap``: ``multiprocessing.Pool(W)``'s
  ``imap_unordered`` / ``imap`` with ``chunksize=500``, results consumed.

Rate = N / wall time of the whole call (start-up and shut-down included, the
same for every row; the modules it needs are imported before the clock).
CPU us/item: the CPU time of the call's own processes (the trial's and its
children's, redis-server not included) per item, which the machine's other
load moves much less than the rate.
Targets (issue #20 item 3; issue #11 asked for 0.5x of each): two-stage >=
0.85x single-stage of the same backend; map (local) >= 1.0x
``Pool.imap_unordered(chunksize=500)``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/pipelines.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "
WORKERS = 2
N = {"local": 400_000, "redis": 200_000, "pool": 1_000_000}
ROWS = ["single-local", "two-stage-local", "map-local", "map-ordered-local",
        "single-redis", "two-stage-redis", "map-redis",
        "pool-imap-unordered", "pool-imap"]
#: (row, baseline, target ratio or None: shown, not a target of issue #11)
TARGETS: list[tuple[str, str, float | None]] = [
    ("two-stage-local", "single-local", 0.85), ("two-stage-redis", "single-redis", 0.85),
    ("map-local", "pool-imap-unordered", 1.0), ("map-ordered-local", "pool-imap", None),
    ("map-redis", "single-redis", None)]


def produce_n(n: int) -> Any:
    return lambda: range(n)


def noop(item: Any) -> None:
    return None


def forward(item: Any) -> Any:
    return item


def identity(item: Any) -> Any:
    return item


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime


def trial(row: str, n: int, url: str | None) -> tuple[float, float]:
    """Run one row with ``n`` items; its wall time and the CPU time of every
    process of the call (this one and the children it waited for), in s."""
    import multiprocessing.pool  # noqa: F401  (imported before the clock, as pcq's backend)

    import pcq
    from pcq.backends import load_backend

    backend = "pool" if row.startswith("pool") else row.rsplit("-", 1)[1]
    if backend != "pool":
        # The clock times the call, not the first import of the backend's
        # modules (a compile from source where no bytecode is cached, e.g.
        # under PYTHONDONTWRITEBYTECODE=1: 25-60 ms for the local backend).
        load_backend(backend)
    opts: dict[str, Any] = {"url": url} if backend == "redis" else {}
    if backend == "redis":
        opts["queue"] = f"bench-{row}-{time.monotonic_ns()}"
    cpu = cpu_seconds()
    started = time.monotonic()
    if row.startswith("single"):
        summary = pcq.run(produce_n(n), noop, workers=WORKERS, **opts)
        assert summary.done == n, summary
    elif row.startswith("two-stage"):
        summary = pcq.run(produce_n(n), forward, noop, workers=WORKERS, **opts)
        assert summary.done == n, summary
    elif row.startswith("map"):
        got = sum(1 for _ in pcq.map(identity, range(n), workers=WORKERS, chunksize=500,
                                     ordered="ordered" in row, **opts))
        assert got == n, got
    else:
        with mp.get_context("fork").Pool(WORKERS) as pool:
            run = pool.imap_unordered if row == "pool-imap-unordered" else pool.imap
            got = sum(1 for _ in run(identity, range(n), chunksize=500))
        assert got == n, got
    return time.monotonic() - started, cpu_seconds() - cpu


def run_trial(row: str, n: int, url: str | None) -> dict[str, Any]:
    """``trial`` in a fresh interpreter: no trial inherits another's heap or children."""
    spec = json.dumps({"row": row, "n": n, "url": url})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipelines", "--trial", spec],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            result: dict[str, Any] = json.loads(line[len(RESULT):])
            return result
    return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no result"])[-1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipelines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--quick", action="store_true", help="N / 10, one repetition")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/pipelines.json")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trial:
        spec = json.loads(args.trial)
        try:
            wall, cpu = trial(spec["row"], spec["n"], spec["url"])
            result = {"ok": True, "wall_s": wall, "rate": spec["n"] / wall,
                      "cpu_us_per_item": cpu / spec["n"] * 1e6}
        except BaseException as exc:  # a trial reports, it never raises
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(RESULT + json.dumps(result), flush=True)
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    samples: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    with RedisServer() as server:
        for rep in range(repeat):
            order = rows[rep % len(rows):] + rows[: rep % len(rows)]  # rotate: drift hits all
            for row in order:
                backend = "pool" if row.startswith("pool") else row.rsplit("-", 1)[1]
                n = N[backend] // (10 if args.quick else 1)
                result = run_trial(row, n, server.url)
                samples[row].append(result)
                shown = f"{result['rate']:,.0f}/s" if result["ok"] else result["error"]
                print(f"  [{rep + 1}/{repeat}] {row:22} {shown}", file=sys.stderr, flush=True)
    medians = {r: statistics.median(s["rate"] for s in got if s["ok"])
               for r, got in samples.items() if any(s["ok"] for s in got)}
    cpu = {r: statistics.median(s["cpu_us_per_item"] for s in got if s["ok"])
           for r, got in samples.items() if any(s["ok"] for s in got)}
    print(f"\n{'row':22} {'median rate':>14} {'CPU us/item':>12}  runs")
    for row in rows:
        rate = f"{medians[row]:,.0f}/s" if row in medians else "failed"
        used = f"{cpu[row]:.3f}" if row in cpu else "-"
        print(f"{row:22} {rate:>14} {used:>12}  {len(samples[row])}")
    print(f"\n{'target':48} {'ratio':>7}  met")
    verdicts = []
    for row, base, least in TARGETS:
        if row in medians and base in medians:
            ratio = medians[row] / medians[base]
            met = None if least is None else ratio >= least
            verdicts.append({"row": row, "baseline": base, "ratio": ratio, "target": least,
                             "met": met})
            verdict = "-" if least is None else f"{'yes' if met else 'NO'} (>= {least})"
            print(f"{row + ' / ' + base:48} {ratio:7.2f}  {verdict}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"workers": WORKERS, "repeat": repeat, "quick": args.quick,
                                     "medians": medians, "cpu_us_per_item": cpu,
                                     "targets": verdicts,
                                     "samples": samples}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
