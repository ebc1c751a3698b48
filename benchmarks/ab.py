"""This tree against a baseline tree, trial by trial: noop, cpu and latency of
one system (default ``pcq-local-1000``) from each tree alternately, in fresh
interpreters, the order flipped every repetition, so both meet the same machine
load.  Prints per-repetition ratios (this / baseline) and their median.

    git archive integ | tar -x -C /tmp/pcq-base
    python -m benchmarks.ab --baseline-tree /tmp/pcq-base --repeat 5
    python -m benchmarks.ab --baseline-tree /tmp/pcq-base --system pcq-redis
    python -m benchmarks.ab --baseline-tree /tmp/pcq-base --repeat 5 --pipelines

A redis system gets a redis-server of its own for the run, emptied after
every trial.

``--pipelines``: the rows of ``benchmarks.pipelines`` instead (single-local,
two-stage-local, map-local, pool-imap-unordered), each from both trees back to
back; besides this / baseline per row, it prints each tree's target ratios
(two-stage / single, map / pool) per repetition, from trials of the same
repetition.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from benchmarks import pipelines, tasks, workloads
from benchmarks.io_bound import ROOT, in_fresh_interpreter
from benchmarks.redis_server import RedisServer
from benchmarks.systems import SYSTEMS

#: workload -> the figures compared, and whether more is better.
FIGURES = {"noop": [("rate", True)], "cpu": [("efficiency", True), ("busy", True)],
           "latency": [("latency_median_ms", False)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    p.add_argument("--baseline-tree", type=Path, required=True)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--system", default="pcq-local-1000")
    p.add_argument("--only", default="noop,cpu,latency")
    p.add_argument("--pipelines", action="store_true", help="the pipeline rows instead")
    args = p.parse_args(argv)
    if args.pipelines:
        return pipeline_rows(args.baseline_tree, args.repeat)
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer()) if SYSTEMS[args.system].needs_redis else None
        values = _trials(args, server)
    _report(args, values)
    return 0


def _trials(args: argparse.Namespace, server: RedisServer | None
            ) -> dict[tuple[str, str, str], list[float]]:
    spin_k = tasks.calibrate_spin(workloads.CPU_TASK_SECONDS)
    chosen = args.only.split(",")
    values: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(args.repeat):
        for workload in chosen:
            n = workloads.sizes(workload, args.system, False)[0]
            trees = [("this", ROOT), ("baseline", args.baseline_tree)]
            for label, tree in trees if rep % 2 == 0 else trees[::-1]:
                spec = {"rep": rep, "workload": workload, "system": args.system, "n": n,
                        "workers": workloads.WORKERS, "spin_k": spin_k,
                        "url": server.url if server else None}
                r = in_fresh_interpreter(["benchmarks.trial", json.dumps(spec)], tree, 300)
                if server is not None:
                    server.command("FLUSHALL")
                if not r.get("ok", True):
                    raise SystemExit(f"{workload} ({label}) failed: {r}")
                shown = []
                for key, _ in FIGURES[workload]:
                    values.setdefault((workload, key, label), []).append(r[key])
                    shown.append(f"{key} {r[key]:,.3f}")
                print(f"  [{rep + 1}/{args.repeat}] {workload:7} {label:8} {', '.join(shown)}",
                      file=sys.stderr)
    return values


def _report(args: argparse.Namespace, values: dict[tuple[str, str, str], list[float]]) -> None:
    chosen = args.only.split(",")
    print(f"{args.system}, {args.repeat} repetitions; ratio = this / baseline per repetition\n")
    print("| workload | figure | this (median) | baseline (median) | ratios | median ratio |")
    print("|---|---|---|---|---|---|")
    for workload in chosen:
        for key, _ in FIGURES[workload]:
            mine, base = values[(workload, key, "this")], values[(workload, key, "baseline")]
            ratios = [a / b for a, b in zip(mine, base, strict=True) if b]
            print(f"| {workload} | {key} | {statistics.median(mine):,.3f} | "
                  f"{statistics.median(base):,.3f} | {' '.join(f'{x:.2f}' for x in ratios)} | "
                  f"{statistics.median(ratios):.3f} |")


PIPELINE_ROWS = ["single-local", "two-stage-local", "map-local", "pool-imap-unordered"]
#: (row, baseline row): the targets of issue #20 item 3.
PIPELINE_TARGETS = [("two-stage-local", "single-local"), ("map-local", "pool-imap-unordered")]


def pipeline_rows(baseline: Path, repeat: int) -> int:
    rates: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    trees = [("this", ROOT), ("baseline", baseline)]
    for rep in range(repeat):
        order = PIPELINE_ROWS[rep % 4:] + PIPELINE_ROWS[: rep % 4]
        for row in order:
            n = pipelines.N["pool" if row.startswith("pool") else "local"]
            spec = json.dumps({"row": row, "n": n, "url": None})
            for label, tree in trees if rep % 2 == 0 else trees[::-1]:
                r = in_fresh_interpreter(["benchmarks.pipelines", "--trial", spec], tree, 300)
                if not r.get("ok"):
                    raise SystemExit(f"{row} ({label}) failed: {r}")
                rates.setdefault((row, label), []).append(r["rate"])
                cpu.setdefault((row, label), []).append(r.get("cpu_us_per_item", 0.0))
                print(f"  [{rep + 1}/{repeat}] {row:20} {label:8} {r['rate']:,.0f}/s",
                      file=sys.stderr)
    print(f"{repeat} repetitions; rate = N / wall time of the call; medians\n")
    print("| row | this (median) | baseline (median) | this / baseline per repetition "
          "| median | CPU us/item this / baseline |\n|---|---|---|---|---|---|")
    for row in PIPELINE_ROWS:
        mine, base = rates[(row, "this")], rates[(row, "baseline")]
        ratios = [a / b for a, b in zip(mine, base, strict=True)]
        print(f"| {row} | {statistics.median(mine):,.0f} | {statistics.median(base):,.0f} | "
              f"{' '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} | "
              f"{statistics.median(cpu[(row, 'this')]):.3f} / "
              f"{statistics.median(cpu[(row, 'baseline')]):.3f} |")
    print("\n| target ratio | tree | per repetition | median | ratio of medians |\n"
          "|---|---|---|---|---|")
    for row, base_row in PIPELINE_TARGETS:
        for label, _ in trees:
            top, bottom = rates[(row, label)], rates[(base_row, label)]
            ratios = [a / b for a, b in zip(top, bottom, strict=True)]
            print(f"| {row} / {base_row} | {label} | {' '.join(f'{x:.2f}' for x in ratios)} | "
                  f"{statistics.median(ratios):.2f} | "
                  f"{statistics.median(top) / statistics.median(bottom):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
